"""One HTTP attempt against an OpenAI-compatible API, measured and classified.

``attempt`` makes exactly one request and returns a ``CallOutcome`` (it does not raise for
HTTP or network errors): latency, time to first token for streamed chat, token usage, and a
classification — ``ok``, retryable (timeout, connection error, 429, 5xx, malformed or
truncated body) or permanent (400, 401, 403, 404, context length exceeded). Retrying, limits
and storage are the caller's business. The API key is sent in the header and nowhere else:
an error body or exception message that quotes it has it replaced by ``***`` before it
leaves ``attempt`` (so it reaches neither ``api_calls.error``, the job error, nor the logs).
"""

from __future__ import annotations

import email.utils
import json
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import requests

Endpoint = Literal["chat", "embeddings", "completions"]
PATHS: dict[str, str] = {
    "chat": "/chat/completions",
    "embeddings": "/embeddings",
    "completions": "/completions",
}
RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504}
_local = threading.local()


@dataclass
class CallOutcome:
    """What one HTTP attempt did."""

    started_at: datetime
    latency_ms: float
    status_code: int | None = None
    ttft_ms: float | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    error_class: str | None = None
    """None when ok; else e.g. timeout, rate_limited, server_error, auth_error."""
    error: str | None = None
    retryable: bool = False
    retry_after_s: float | None = None
    """From Retry-After or x-ratelimit-reset-* headers, when the server said."""
    body: dict[str, Any] | None = field(default=None, repr=False)
    """The parsed JSON body (non-streamed calls)."""
    text: str = ""
    """Streamed chat: the concatenated content."""

    @property
    def ok(self) -> bool:
        return self.error_class is None and self.status_code == 200


def _session() -> requests.Session:
    sess = getattr(_local, "session", None)
    if sess is None:
        sess = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=64)
        sess.mount("http://", adapter)
        sess.mount("https://", adapter)
        _local.session = sess
    return sess


_DURATION = re.compile(
    r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?!s))?(?:(\d+(?:\.\d+)?)s)?(?:(\d+(?:\.\d+)?)ms)?$"
)


def parse_duration_s(text: str) -> float | None:
    """'1s', '6m0s', '0.35s', '20ms', '2' → seconds; None if unreadable."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    m = _DURATION.fullmatch(text)
    if not m or not any(m.groups()):
        return None
    h, mi, s, ms = (float(g) if g else 0.0 for g in m.groups())
    return h * 3600 + mi * 60 + s + ms / 1000


_LIMIT_KINDS = ("requests", "tokens")


def retry_after_s(headers: Any, now: float | None = None) -> float | None:
    """Seconds to wait, from Retry-After (seconds or HTTP date) or x-ratelimit-reset-*.

    Without Retry-After, the reset of the exhausted limit counts: the kind (requests or
    tokens) whose ``x-ratelimit-remaining-*`` is 0, else one whose remaining is not given;
    the longest reset when no remaining header says which.
    """
    value = headers.get("Retry-After")
    if value:
        value = value.strip()
        if value.replace(".", "", 1).isdigit():
            return float(value)
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            when = None
        if when is not None:
            now = time.time() if now is None else now
            return max(0.0, when.timestamp() - now)
    resets = {k: _header_s(headers, f"x-ratelimit-reset-{k}") for k in _LIMIT_KINDS}
    resets = {k: v for k, v in resets.items() if v is not None}
    if not resets:
        return None
    remaining = {k: _header_number(headers, f"x-ratelimit-remaining-{k}") for k in _LIMIT_KINDS}
    exhausted = [k for k in resets if remaining[k] is not None and remaining[k] <= 0]
    unknown = [k for k in resets if remaining[k] is None]
    chosen = exhausted or unknown or list(resets)
    return max(resets[k] for k in chosen)


def _header_s(headers: Any, name: str) -> float | None:
    value = headers.get(name)
    return parse_duration_s(value) if value else None


def _header_number(headers: Any, name: str) -> float | None:
    try:
        return float(headers.get(name))
    except (TypeError, ValueError):
        return None


def _error_message(resp: requests.Response, secret: str | None) -> tuple[str, str | None]:
    """The error body's message (the key redacted, then clipped) and its code."""
    try:
        err = resp.json().get("error", {})
        if isinstance(err, dict):
            return redact(str(err.get("message", "")), secret)[:300], err.get("code")
        return redact(str(err), secret)[:300], None
    except ValueError:
        return redact(resp.text, secret)[:300].replace("\n", " "), None


def _classify_http_error(
    out: CallOutcome, resp: requests.Response, key_env: str | None, secret: str | None
) -> None:
    message, code = _error_message(resp, secret)
    status = resp.status_code
    out.retryable = status in RETRYABLE_STATUS
    if status == 429:
        out.error_class = "rate_limited"
        out.retry_after_s = retry_after_s(resp.headers)
    elif status >= 500:
        out.error_class = "server_error"
    elif status == 401:
        out.error_class = "auth_error"
        hint = f"check {key_env}" if key_env else "the provider wants a key"
        message = f"401 unauthorized ({hint}): {message}"
    elif code == "context_length_exceeded" or "context length" in message.lower():
        out.error_class = "context_length_exceeded"
    elif status == 404:
        out.error_class = "not_found"
    elif status == 403:
        out.error_class = "forbidden"
    else:
        out.error_class = "bad_request" if not out.retryable else "http_error"
    out.error = f"HTTP {status}: {message}" if not message.startswith("401") else message


def attempt(
    base_url: str,
    endpoint: Endpoint,
    payload: dict[str, Any],
    *,
    api_key: str | None,
    key_env: str | None = None,
    timeout_s: float = 60.0,
) -> CallOutcome:
    """Make one request and measure it. Streams when ``payload['stream']`` is true (chat)."""
    url = base_url.rstrip("/") + PATHS[endpoint]
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    stream = bool(payload.get("stream"))
    started_at = datetime.now(UTC)
    t0 = time.perf_counter()
    out = CallOutcome(started_at=started_at, latency_ms=0.0)
    try:
        resp = _session().post(url, json=payload, headers=headers, timeout=timeout_s, stream=stream)
        with resp:
            out.status_code = resp.status_code
            if resp.status_code != 200:
                _classify_http_error(out, resp, key_env, api_key)
            elif stream:
                _read_stream(resp, out, t0)
            else:
                _read_body(resp, out, endpoint)
    except requests.Timeout as exc:
        out.error_class, out.retryable = "timeout", True
        out.error = f"no answer within {timeout_s:g} s ({type(exc).__name__})"
    except requests.ConnectionError as exc:
        out.error_class, out.retryable = "connection_error", True
        out.error = f"connection failed: {redact(str(exc), api_key)[:200]}"
    except requests.RequestException as exc:
        out.error_class, out.retryable = "malformed_response", True
        out.error = f"{type(exc).__name__}: {redact(str(exc), api_key)[:200]}"
    out.latency_ms = (time.perf_counter() - t0) * 1000.0
    if out.error:
        out.error = redact(out.error, api_key)  # whatever path wrote it
    return out


def redact(text: str, secret: str | None) -> str:
    """``text`` with every occurrence of ``secret`` replaced by ``***``."""
    return text.replace(secret, "***") if secret else text


def _read_body(resp: requests.Response, out: CallOutcome, endpoint: str) -> None:
    try:
        body = resp.json()
        usage = body.get("usage") or {}
        out.input_tokens = int(usage.get("prompt_tokens") or 0)
        out.output_tokens = int(usage.get("completion_tokens") or 0)
        if endpoint == "embeddings":
            if not isinstance(body.get("data"), list):
                raise ValueError("no 'data' list")
        elif not body.get("choices"):
            raise ValueError("no 'choices'")
        out.body = body
    except (ValueError, AttributeError, TypeError) as exc:
        out.error_class, out.retryable = "malformed_response", True
        out.error = f"unreadable JSON body: {str(exc)[:200]}"


def _read_stream(resp: requests.Response, out: CallOutcome, t0: float) -> None:
    parts: list[str] = []
    done = False
    n_chunks = 0
    try:
        for raw in resp.iter_lines(decode_unicode=True):
            if not raw or not raw.startswith("data:"):
                continue
            data = raw[5:].strip()
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            usage = chunk.get("usage")
            if usage:
                out.input_tokens = int(usage.get("prompt_tokens") or 0)
                out.output_tokens = int(usage.get("completion_tokens") or 0)
            for choice in chunk.get("choices") or []:
                delta = (choice.get("delta") or {}).get("content")
                if delta:
                    if out.ttft_ms is None:
                        out.ttft_ms = (time.perf_counter() - t0) * 1000.0
                    parts.append(delta)
                    n_chunks += 1
    except (ValueError, AttributeError) as exc:
        out.error_class, out.retryable = "malformed_response", True
        out.error = f"unreadable stream chunk: {str(exc)[:200]}"
        return
    except requests.RequestException as exc:
        out.error_class, out.retryable = "truncated_stream", True
        out.error = f"stream broke off: {str(exc)[:200]}"
        return
    if not done:
        out.error_class, out.retryable = "truncated_stream", True
        out.error = "stream ended without [DONE]"
        return
    out.text = "".join(parts)
    if not out.output_tokens:
        out.output_tokens = n_chunks  # no usage chunk: one content chunk ≈ one token


def chat_payload(
    model: str,
    prompt: str | list[dict[str, str]],
    *,
    max_tokens: int,
    temperature: float,
    stream: bool,
) -> dict[str, Any]:
    """A chat request: ``prompt`` is the user message, or the whole list of messages."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    payload: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": stream,
    }
    if stream:
        payload["stream_options"] = {"include_usage": True}
    return payload


def embeddings_payload(model: str, inputs: str | list[str]) -> dict[str, Any]:
    return {"model": model, "input": inputs}
