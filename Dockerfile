FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
# CPU torch first (override with --build-arg TORCH=torch for a CUDA build)
ARG TORCH="torch==2.13.0"
RUN pip install "${TORCH}" --index-url https://download.pytorch.org/whl/cpu || pip install "${TORCH}"
COPY pyproject.toml README.md ./
COPY interpq ./interpq
RUN pip install .
RUN useradd --create-home interpq && mkdir -p /artifacts && chown interpq /artifacts
USER interpq
ENTRYPOINT ["interpq"]
CMD ["--help"]
