# The interpq image: every service of docker-compose.yml runs it with a different command.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
# torch first. Default: the CPU build. The compose GPU profile builds with TORCH=torch and an
# empty TORCH_INDEX_URL, which installs PyPI's CUDA build.
ARG TORCH="torch==2.13.0"
ARG TORCH_INDEX_URL="https://download.pytorch.org/whl/cpu"
RUN if [ -n "$TORCH_INDEX_URL" ]; then pip install "$TORCH" --index-url "$TORCH_INDEX_URL"; \
    else pip install "$TORCH"; fi
COPY pyproject.toml README.md ./
COPY interpq ./interpq
RUN pip install .
# /artifacts: the shared artifact store; /var/lib/interpq: beat's state (named volumes take
# these owners when first mounted)
RUN useradd --create-home interpq \
    && mkdir -p /artifacts /var/lib/interpq \
    && chown interpq /artifacts /var/lib/interpq
USER interpq
WORKDIR /home/interpq
# Exec form: `interpq worker` execs Celery in this process, so the stop signal reaches Celery
# (warm shutdown), not a shell.
STOPSIGNAL SIGTERM
ENTRYPOINT ["interpq"]
CMD ["--help"]
