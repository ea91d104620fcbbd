"""The HTTP client's pure parts (429 waits) and its key redaction against the local provider."""

from __future__ import annotations

import email.utils
import os
from collections.abc import Iterator

import pytest
import requests
from requests.structures import CaseInsensitiveDict

from interpq.providers import openai_http
from interpq.providers.local.server import LocalProviderServer, ServerOptions

pytestmark = pytest.mark.timeout(60)
NOW = 1_800_000_000.0


def _h(**headers: str) -> CaseInsensitiveDict[str]:
    return CaseInsensitiveDict({k.replace("_", "-"): v for k, v in headers.items()})


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("2", 2.0), ("0.35", 0.35), ("1s", 1.0), ("0.35s", 0.35), ("20ms", 0.02),
     ("6m0s", 360.0), ("1m30.5s", 90.5), ("1h2m3s", 3723.0), ("soon", None), ("", None)],
)  # fmt: skip
def test_parse_duration_s(text: str, seconds: float | None) -> None:
    assert openai_http.parse_duration_s(text) == (
        pytest.approx(seconds) if seconds is not None else None
    )


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        # Retry-After wins: seconds, then an HTTP date 7 s ahead
        (_h(Retry_After="3", x_ratelimit_reset_tokens="6m0s"), 3.0),
        (_h(Retry_After=email.utils.formatdate(NOW + 7, usegmt=True)), 7.0),
        (_h(Retry_After=email.utils.formatdate(NOW - 7, usegmt=True)), 0.0),  # in the past
        # no remaining headers: the longest reset
        (_h(x_ratelimit_reset_requests="1s", x_ratelimit_reset_tokens="6m0s"), 360.0),
        (_h(x_ratelimit_reset_requests="20ms"), 0.02),
        # the requests limit is exhausted, tokens are not: its reset, not the tokens' 6 min
        (_h(x_ratelimit_reset_requests="1s", x_ratelimit_reset_tokens="6m0s",
            x_ratelimit_remaining_requests="0", x_ratelimit_remaining_tokens="149000"), 1.0),
        # the tokens limit is exhausted
        (_h(x_ratelimit_reset_requests="1s", x_ratelimit_reset_tokens="6m0s",
            x_ratelimit_remaining_requests="12", x_ratelimit_remaining_tokens="0"), 360.0),
        # only one remaining header, not zero: the other limit is the one to wait for
        (_h(x_ratelimit_reset_requests="1s", x_ratelimit_reset_tokens="20ms",
            x_ratelimit_remaining_requests="5"), 0.02),
        # both exhausted: the longer
        (_h(x_ratelimit_reset_requests="1s", x_ratelimit_reset_tokens="2s",
            x_ratelimit_remaining_requests="0", x_ratelimit_remaining_tokens="0"), 2.0),
        # neither exhausted (the 429 came from elsewhere): the longest, to be safe
        (_h(x_ratelimit_reset_requests="1s", x_ratelimit_reset_tokens="2s",
            x_ratelimit_remaining_requests="3", x_ratelimit_remaining_tokens="9"), 2.0),
        (_h(), None),
        (_h(x_ratelimit_reset_requests="whenever"), None),
    ],
)  # fmt: skip
def test_retry_after_s(headers: CaseInsensitiveDict[str], seconds: float | None) -> None:
    got = openai_http.retry_after_s(headers, now=NOW)
    assert got == (pytest.approx(seconds, abs=1e-6) if seconds is not None else None)


KEY_ENV = "INTERPQ_TEST_ECHO_KEY"
RIGHT_KEY = "sk-echo-right-key-2468"


@pytest.fixture(scope="module")
def echoing_server() -> Iterator[LocalProviderServer]:
    os.environ[KEY_ENV] = RIGHT_KEY
    with LocalProviderServer(
        ServerOptions(api_key_env=KEY_ENV, echo_authorization=True, error_rate=1.0)
    ) as srv:
        yield srv


@pytest.mark.parametrize(
    ("key", "status"), [("sk-echo-WRONG-key-1357", 401), (RIGHT_KEY, 500)]
)  # fmt: skip
def test_an_echoed_key_is_redacted(
    echoing_server: LocalProviderServer, key: str, status: int
) -> None:
    payload = openai_http.embeddings_payload("all-MiniLM-L6-v2", "hello")
    raw = requests.post(
        echoing_server.base_url + "/embeddings", json=payload,
        headers={"Authorization": f"Bearer {key}"}, timeout=10,
    )  # fmt: skip
    assert raw.status_code in (status, 502, 503) and key in raw.text  # the server does echo it
    out = openai_http.attempt(
        echoing_server.base_url, "embeddings", payload, api_key=key, key_env=KEY_ENV
    )
    assert out.status_code in (status, 502, 503) and out.error is not None
    assert key not in out.error and "Bearer ***" in out.error, out.error
    assert (status == 401) == ("401" in out.error and KEY_ENV in out.error)
