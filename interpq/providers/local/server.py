"""``interpq serve``: a local OpenAI-compatible HTTP server backed by real local models.

It serves ``/v1/models``, ``/v1/embeddings`` (all-MiniLM-L6-v2, vectors identical to
sentence-transformers), ``/v1/chat/completions`` and ``/v1/completions`` (a causal LM: the
tiny random-weight GPT-2 ``tiny-gpt2-random-weights`` unless ``--causal-lm`` names another)
on 127.0.0.1, with no model hub access. Models load on first use (or at start with
``preload``) and run under ``torch.inference_mode()`` with a lock per model.

Beyond OpenAI, for tests, demos and benchmarks of rate limiters and retries:

- ``GET /health`` → ``{"ok": true}`` (never needs the API key).
- ``GET /stats`` → counts of ``/v1`` requests by path and status, ``n_429``,
  ``max_accepted_in_1s`` (the most requests let through in any sliding 1-second window),
  ``max_sent_in_1s`` (the most received, 429s included), ``first_unix_s``/``last_unix_s``/``last_ok_unix_s``
  and ``recent`` ``[t_unix_s, status]`` pairs (status 0: closed without a response);
  ``POST /stats/reset`` clears them.
- ``GET /faults`` / ``POST /faults`` read / change the fault settings at runtime, e.g.
  ``{"next_429s": 3, "retry_after_s": 2}`` or ``{"rate_limit_rps": null, "error_rate": 0.5}``
  (see ``FaultSettings`` for every field).
- ``GET /script`` / ``POST /script`` read / replace scripted chat answers: rules matching the
  last user message answer before the causal LM does (``scripted.py``).

Faults apply to ``/v1`` requests after the API-key check, in this order: forced 429s, the
sliding-window rate limit (429 with ``Retry-After`` and ``x-ratelimit-*`` headers), hangs
(``timeout_rate``), injected 5xx (``error_rate``), then ``added_latency_ms``. The API key and
the ``Authorization`` header are never logged.

The parts: ``local_backends`` (inference), ``local_openai`` (OpenAI parameters and shapes),
``local_faults`` (rate limit, faults, stats), ``local_http`` (HTTP plumbing); this module holds
the options, routing and auth, the server object and the command line.
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import os
import random
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from interpq.hf.loading import TINY_GPT2_NAME
from interpq.providers.local.backends import ApiError, CausalLMBackend, EmbeddingBackend
from interpq.providers.local.faults import (
    FaultInjector,
    FaultSettings,
    RequestStats,
    Verdict,
    retry_after_header,
)
from interpq.providers.local.http import Handler, HTTPServer
from interpq.providers.local.openai import OpenAIRoutes, Responder
from interpq.providers.local.scripted import ChatScript

__all__ = ["LocalProviderServer", "ServerOptions", "build_parser", "main"]

logger = logging.getLogger(__name__)

STOP_JOIN_S = 5.0

Route = Callable[[dict[str, Any], Responder, float], None]


@dataclass(frozen=True)
class ServerOptions(FaultSettings):
    """How to run the local provider server: the fault knobs of ``FaultSettings`` (all off by
    default, adjustable later through ``POST /faults``) plus where and what to serve."""

    host: str = "127.0.0.1"
    """Interface to listen on."""
    port: int = 0
    """TCP port; 0 picks a free one (read it back from ``base_url``)."""
    causal_lm: str | None = None
    """Hugging Face id or local path of the chat/completions model; None: the tiny random GPT-2."""
    preload: bool = False
    """Load both models in ``start()`` instead of on first use."""
    api_key_env: str | None = None
    """Name of an environment variable; when set, requests need ``Authorization: Bearer <it>``."""
    seed: int = 0
    """Seed of the fault RNG and of sampling for requests without their own ``seed``."""
    script: str | None = None
    """A JSON file of scripted chat answers (``scripted.py``); change at runtime: POST /script."""

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        super().__post_init__()  # validates the fault fields

    def fault_settings(self) -> FaultSettings:
        """The fault fields as the runtime-adjustable ``FaultSettings``."""
        return FaultSettings(**{f.name: getattr(self, f.name) for f in fields(FaultSettings)})


class _App:
    """Routing, auth and faults around ``OpenAIRoutes``."""

    def __init__(self, options: ServerOptions, stopping: threading.Event) -> None:
        self.options = options
        self.stopping = stopping
        self.api_key = self._read_api_key(options.api_key_env)
        self.embedder = EmbeddingBackend()
        causal_name = options.causal_lm or TINY_GPT2_NAME
        self.lm = CausalLMBackend(causal_name, random_weights=options.causal_lm is None)
        sampling_rng = random.Random(options.seed + 1)
        seed_lock = threading.Lock()

        def draw_seed() -> int:
            with seed_lock:
                return sampling_rng.getrandbits(63)

        self.routes = OpenAIRoutes(self.embedder, self.lm, draw_seed)
        self.stats = RequestStats()
        self.faults = FaultInjector(options.fault_settings(), options.seed, self.stats)
        self.script = ChatScript()
        if options.script:
            self.script.replace(json.loads(Path(options.script).read_text()))

    @staticmethod
    def _read_api_key(env_name: str | None) -> str | None:
        if env_name is None:
            return None
        key = os.environ.get(env_name)
        if not key:
            raise ValueError(
                f"api_key_env names {env_name}, but that environment variable is empty"
            )
        return key

    def dispatch(self, out: Handler, method: str, path: str, body: bytes) -> None:
        if path == "/health":
            self._expect(method, "GET", path)
            out.send_json(200, {"ok": True})
            return
        self._check_auth(out)
        if path in ("/stats", "/stats/reset", "/faults", "/script"):
            self._operator(out, method, path, body)
            return
        route = self._route(method, path)
        verdict = self.faults.admit()
        if verdict.action == "reject_429":
            raise self._too_many(verdict)
        if verdict.action == "hang":
            out.close_connection = True
            self.stopping.wait(verdict.hang_s)
            return
        if verdict.action == "fail":
            out.sleep(verdict.latency_s)
            msg = (
                f"injected fault: the server answers {verdict.status} (error_rate){self._echo(out)}"
            )
            raise ApiError(verdict.status, msg, err_type="server_error")
        payload = self._json(body) if method == "POST" else {}
        if path == "/v1/chat/completions":
            reply = self.script.answer(payload.get("model"), payload.get("messages"))
            if reply is not None:
                self.routes.scripted_chat(payload, reply, out, verdict.latency_s)
                return
        route(payload, out, verdict.latency_s)

    def _route(self, method: str, path: str) -> Route:
        routes: dict[str, tuple[str, Route]] = {
            "/v1/embeddings": ("POST", self.routes.embeddings),
            "/v1/chat/completions": ("POST", self.routes.chat),
            "/v1/completions": ("POST", self.routes.completions),
            "/v1/models": ("GET", self.routes.models),
        }
        if path.startswith("/v1/models/"):
            model_id = path[len("/v1/models/") :]
            routes[path] = ("GET", lambda _payload, out, lat: self.routes.model(model_id, out, lat))
        if path not in routes:
            raise ApiError(404, f"Invalid URL ({method} {path})", code="unknown_url")
        wanted, handler = routes[path]
        self._expect(method, wanted, path)
        return handler

    @staticmethod
    def _expect(method: str, wanted: str, path: str) -> None:
        if method != wanted:
            raise ApiError(405, f"{path} accepts {wanted}, not {method}", code="method_not_allowed")

    def _check_auth(self, out: Handler) -> None:
        if self.api_key is None:
            return
        given = out.headers.get("Authorization") or ""
        token = given[len("Bearer ") :] if given.startswith("Bearer ") else ""
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            raise ApiError(
                401,
                "Incorrect or missing API key: send 'Authorization: Bearer <key>' with the key "
                f"from ${self.options.api_key_env}{self._echo(out)}",
                code="invalid_api_key",
            )

    def _echo(self, out: Handler) -> str:
        """The Authorization header quoted, when the ``echo_authorization`` fault is on."""
        if not self.faults.settings.echo_authorization:
            return ""
        return f" (you sent Authorization: {out.headers.get('Authorization')!r})"

    def _operator(self, out: Handler, method: str, path: str, body: bytes) -> None:
        if path == "/stats":
            self._expect(method, "GET", path)
            out.send_json(200, self.stats.snapshot())
        elif path == "/stats/reset":
            self._expect(method, "POST", path)
            self.stats.reset()
            out.send_json(200, {"ok": True})
        elif path == "/script":
            if method == "GET":
                out.send_json(200, {"rules": self.script.describe()})
                return
            self._expect(method, "POST", path)
            try:
                rules = self.script.replace(self._json(body))
            except ValueError as exc:
                raise ApiError(400, f"script: {exc}") from exc
            logger.info("chat script set: %d rules", len(rules))
            out.send_json(200, {"rules": rules})
        elif method == "GET":
            out.send_json(200, self.faults.settings.as_dict())
        else:
            self._expect(method, "POST", path)
            try:
                settings = self.faults.update(self._json(body))
            except ValueError as exc:
                raise ApiError(400, str(exc)) from exc
            logger.info("fault settings changed: %s", settings.as_dict())
            out.send_json(200, settings.as_dict())

    @staticmethod
    def _json(body: bytes) -> dict[str, Any]:
        try:
            payload = json.loads(body or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}") from exc
        if not isinstance(payload, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return payload

    @staticmethod
    def _too_many(verdict: Verdict) -> ApiError:
        wait_s = max(verdict.retry_after_s, 0.0)
        headers = {
            "Retry-After": retry_after_header(wait_s),
            "x-ratelimit-reset-requests": f"{wait_s:.2f}s",
            "x-ratelimit-remaining-requests": str(verdict.remaining or 0),
        }
        if verdict.limit is not None:
            headers["x-ratelimit-limit-requests"] = str(verdict.limit)
        return ApiError(
            429,
            f"Rate limit reached for requests. Please try again in {wait_s * 1000:.0f}ms.",
            code="rate_limit_exceeded",
            err_type="requests",
            headers=headers,
        )


class LocalProviderServer:
    """The server in a background thread: ``with LocalProviderServer(opts).start() as srv:``."""

    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self._stopping = threading.Event()
        self._app = _App(options, self._stopping)
        self._httpd: HTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> LocalProviderServer:
        """Bind, (optionally) load the models, and serve; returns once the socket listens."""
        if self._httpd is not None:
            raise RuntimeError("the server is already started")
        httpd = HTTPServer((self.options.host, self.options.port), Handler)
        httpd.app = self._app
        httpd.stopping = self._stopping
        self._httpd = httpd
        if self.options.preload:
            self._app.embedder.load()
            self._app.lm.load()
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"interpq-serve-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("the server is not started: call start() first")
        return int(self._httpd.server_address[1])

    @property
    def root_url(self) -> str:
        """``http://HOST:PORT`` (``/health``, ``/stats`` and ``/faults`` live here)."""
        host = self.options.host if self.options.host not in ("", "0.0.0.0") else "127.0.0.1"
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI base URL, ``http://HOST:PORT/v1``."""
        return f"{self.root_url}/v1"

    def stop(self) -> None:
        """Stop serving, wake hanging requests, and close the socket."""
        self._stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(STOP_JOIN_S)
        self._httpd, self._thread = None, None

    def __enter__(self) -> LocalProviderServer:
        return self if self._httpd is not None else self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``interpq serve`` arguments (shared by ``build_parser`` and the ``interpq`` CLI)."""
    d = ServerOptions()
    add = parser.add_argument
    add("--host", default=d.host, help="interface to listen on (default %(default)s)")
    add(
        "--port",
        type=int,
        default=8765,
        help="TCP port, 0 picks a free one (default %(default)s: the `local` provider preset's)",
    )
    add(
        "--causal-lm",
        metavar="PATH_OR_ID",
        help=f"causal LM for chat/completions (default: {TINY_GPT2_NAME}, random weights)",
    )
    add("--preload", action="store_true", help="load the models at start, not on first use")
    faults = parser.add_argument_group(
        "faults (all off by default; change at runtime: POST /faults)"
    )
    fadd = faults.add_argument
    fadd("--rate-limit-rps", type=float, metavar="L", help="sliding-window limit: 429 beyond it")
    fadd("--rate-limit-window-s", type=float, default=d.rate_limit_window_s, metavar="W",
         help="width of the rate-limit window (default %(default)s)")  # fmt: skip
    fadd(
        "--force-429-every", type=int, default=0, metavar="N", help="answer every N-th request 429"
    )
    fadd("--retry-after-s", type=float, metavar="S", help="every 429 asks to wait S seconds")
    fadd("--error-rate", type=float, default=0.0, metavar="P", help="fraction answered 500/502/503")
    fadd("--added-latency-ms", type=float, default=0.0, metavar="X", help="delay every answer")
    fadd("--timeout-rate", type=float, default=0.0, metavar="P",
         help="fraction that hang --hang-s seconds, then close with no response")  # fmt: skip
    fadd(
        "--hang-s",
        type=float,
        default=d.hang_s,
        metavar="S",
        help="how long a hang lasts (default %(default)s)",
    )
    fadd(
        "--seed",
        type=int,
        default=d.seed,
        metavar="N",
        help="seed of fault RNG and default sampling",
    )
    add("--script", metavar="FILE.json",
        help="scripted chat answers: {\"rules\": [{\"match\": REGEX, \"replies\": [...]}]} "
        "(change at runtime: POST /script)")  # fmt: skip
    add("--api-key-env", metavar="NAME",
        help="require 'Authorization: Bearer $NAME' on every request but /health")  # fmt: skip
    add("--torch-threads", type=int, metavar="N", help="torch.set_num_threads(N) before serving")
    add("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="DEBUG logs one line per request (default %(default)s)")  # fmt: skip


def options_from_args(args: argparse.Namespace) -> ServerOptions:
    """``ServerOptions`` from parsed ``add_arguments`` arguments."""
    return ServerOptions(
        host=args.host,
        port=args.port,
        causal_lm=args.causal_lm,
        preload=args.preload,
        rate_limit_rps=args.rate_limit_rps,
        rate_limit_window_s=args.rate_limit_window_s,
        error_rate=args.error_rate,
        added_latency_ms=args.added_latency_ms,
        timeout_rate=args.timeout_rate,
        hang_s=args.hang_s,
        api_key_env=args.api_key_env,
        seed=args.seed,
        force_429_every=args.force_429_every,
        retry_after_s=args.retry_after_s,
        script=args.script,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="interpq serve",
        description="A local OpenAI-compatible server (embeddings, chat, completions) backed by "
        "local Hugging Face models, with optional rate limits and injected faults. "
        "Prints its base URL (http://HOST:PORT/v1) on stdout once listening.",
    )
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Serve in the foreground until SIGINT or SIGTERM."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    try:
        server = LocalProviderServer(options_from_args(args))
    except ValueError as exc:
        print(f"interpq serve: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    try:
        server.start()
        logger.info("serving on %s", server.base_url)
        print(server.base_url, flush=True)
        while not stop.wait(0.5):
            pass
        logger.info("stopping")
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
