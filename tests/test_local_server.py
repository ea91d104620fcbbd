"""The local OpenAI-compatible provider server, tested over real HTTP with real local models."""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import torch

from interpq.hf.loading import (
    MINILM_NAME,
    TINY_GPT2_NAME,
    LoadedModel,
    minilm_path,
    tiny_gpt2,
)
from interpq.providers.local.backends import render_messages
from interpq.providers.local.faults import retry_after_header
from interpq.providers.local.server import (
    LocalProviderServer,
    ServerOptions,
    build_parser,
    options_from_args,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
CHAT = TINY_GPT2_NAME
HELLO = [{"role": "user", "content": "Say something about sparse autoencoders."}]


@pytest.fixture(scope="module", autouse=True)
def _few_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def server() -> Iterator[LocalProviderServer]:
    with LocalProviderServer(ServerOptions(preload=True)).start() as srv:
        yield srv


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return tiny_gpt2()


def _post(srv: LocalProviderServer, path: str, body: dict, **kw: object) -> requests.Response:
    return requests.post(srv.base_url + path, json=body, timeout=60, **kw)


def _sse(resp: requests.Response) -> list[dict | str]:
    """The ``data:`` payloads of an event stream, JSON-decoded except ``[DONE]``."""
    events: list[dict | str] = []
    for line in resp.iter_lines(decode_unicode=True):
        if line:
            assert line.startswith("data: "), line
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


# ---- models and embeddings ------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_models_lists_embedding_and_chat_model(server: LocalProviderServer) -> None:
    resp = requests.get(server.base_url + "/models", timeout=10)
    assert resp.status_code == 200
    cards = {card["id"]: card for card in resp.json()["data"]}
    assert set(cards) == {MINILM_NAME, CHAT}
    assert "random" in cards[CHAT]["note"]
    assert requests.get(server.root_url + "/health", timeout=10).json() == {"ok": True}


@pytest.mark.timeout(60)
def test_embeddings_equal_sentence_transformers(server: LocalProviderServer) -> None:
    from sentence_transformers import SentenceTransformer

    texts = ["Sparse autoencoders find features.", "A cat sat on the mat, twice!", "x"]
    resp = _post(server, "/embeddings", {"model": MINILM_NAME, "input": texts})
    assert resp.status_code == 200
    body = resp.json()
    assert body["object"] == "list" and body["model"] == MINILM_NAME
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > len(texts)
    got = np.array([d["embedding"] for d in body["data"]])

    reference = SentenceTransformer(str(minilm_path()), device="cpu")
    expected = reference.encode(texts, convert_to_numpy=True)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)

    for i, text in enumerate(texts):
        single = _post(server, "/embeddings", {"model": MINILM_NAME, "input": text}).json()
        np.testing.assert_allclose(single["data"][0]["embedding"], got[i], atol=1e-5, rtol=0)


@pytest.mark.timeout(30)
def test_embeddings_base64_and_refusals(server: LocalProviderServer) -> None:
    body = {"model": MINILM_NAME, "input": ["hello"]}
    as_float = _post(server, "/embeddings", body).json()["data"][0]["embedding"]
    packed = _post(server, "/embeddings", {**body, "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(packed["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, as_float, atol=1e-7)

    token_ids = _post(server, "/embeddings", {"model": MINILM_NAME, "input": [[101, 102]]})
    assert token_ids.status_code == 400
    assert token_ids.json()["error"]["type"] == "invalid_request_error"


# ---- chat completions -------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_streamed_chat_equals_greedy_text_and_reports_usage(server: LocalProviderServer) -> None:
    body = {"model": CHAT, "messages": HELLO, "max_tokens": 12, "temperature": 0}
    plain = _post(server, "/chat/completions", body).json()
    assert plain["object"] == "chat.completion" and plain["model"] == CHAT
    usage = plain["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    resp = _post(server, "/chat/completions", stream_body, stream=True)
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    events = _sse(resp)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == CHAT for c in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == usage
    with_choice = chunks[:-1]
    assert with_choice[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in with_choice)
    assert text == plain["choices"][0]["message"]["content"]
    assert len(with_choice) >= 1 + usage["completion_tokens"]

    no_usage = _sse(_post(server, "/chat/completions", {**body, "stream": True}, stream=True))
    assert all(c == "[DONE]" or c["choices"] for c in no_usage)


@pytest.mark.timeout(30)
def test_top_logprobs_match_a_direct_forward_pass(
    server: LocalProviderServer, tiny: LoadedModel
) -> None:
    k, n = 5, 6
    body = {"model": CHAT, "messages": HELLO, "max_tokens": n, "temperature": 0}
    resp = _post(server, "/chat/completions", {**body, "logprobs": True, "top_logprobs": k})
    content = resp.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == resp.json()["usage"]["completion_tokens"]

    ids = tiny.tokenizer(render_messages(HELLO), add_special_tokens=False)["input_ids"]
    assert resp.json()["usage"]["prompt_tokens"] == len(ids)
    for entry in content:
        with torch.inference_mode():
            logits = tiny.model(torch.tensor([ids])).logits[0, -1]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        chosen = int(torch.argmax(logprobs))
        assert entry["token"] == tiny.tokenizer.decode([chosen])
        assert entry["logprob"] == pytest.approx(float(logprobs[chosen]), abs=1e-4)
        assert entry["bytes"] == list(entry["token"].encode())
        top = entry["top_logprobs"]
        assert len(top) == k
        values = [t["logprob"] for t in top]
        assert values == sorted(values, reverse=True)
        assert top[0]["logprob"] == pytest.approx(entry["logprob"], abs=1e-6)
        np.testing.assert_allclose(values, torch.topk(logprobs, k).values.numpy(), atol=1e-4)
        ids.append(chosen)


@pytest.mark.timeout(30)
def test_sampling_with_a_seed_repeats(server: LocalProviderServer) -> None:
    body = {"model": CHAT, "messages": HELLO, "max_tokens": 8, "temperature": 1.0, "seed": 7}
    first = _post(server, "/chat/completions", body).json()["choices"][0]["message"]["content"]
    again = _post(server, "/chat/completions", body).json()["choices"][0]["message"]["content"]
    assert first == again


@pytest.mark.timeout(60)
def test_causal_lm_option_serves_that_model_under_its_name(
    tmp_path: Path, tiny: LoadedModel
) -> None:
    path = tmp_path / "my-lm"
    tiny.model.save_pretrained(path)
    tiny.tokenizer.save_pretrained(path)
    with LocalProviderServer(ServerOptions(causal_lm=str(path))) as srv:
        cards = requests.get(srv.base_url + "/models", timeout=10).json()["data"]
        assert [c["id"] for c in cards] == [MINILM_NAME, str(path)]
        assert "note" not in cards[1]
        body = {"model": str(path), "messages": HELLO, "max_tokens": 3, "temperature": 0}
        resp = _post(srv, "/chat/completions", body)
        assert resp.status_code == 200 and resp.json()["model"] == str(path)
        assert _post(srv, "/chat/completions", {**body, "model": CHAT}).status_code == 404


# ---- legacy completions ----------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_completions_legacy_logprobs_format(server: LocalProviderServer) -> None:
    body = {"model": CHAT, "prompt": "The cat sat on", "max_tokens": 5, "temperature": 0}
    resp = _post(server, "/completions", {**body, "logprobs": 3})
    assert resp.status_code == 200
    choice = resp.json()["choices"][0]
    assert resp.json()["object"] == "text_completion"
    lp = choice["logprobs"]
    n = resp.json()["usage"]["completion_tokens"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == n
    assert len(lp["text_offset"]) == n and lp["text_offset"][0] == 0
    assert lp["text_offset"] == sorted(lp["text_offset"])
    for token, logprob, top in zip(
        lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True
    ):
        assert 1 <= len(top) <= 3 and logprob <= 0
        assert top[token] == pytest.approx(logprob)  # greedy: the chosen token is the top one

    echoed = _post(server, "/completions", {**body, "logprobs": 1, "echo": True}).json()
    text, elp = echoed["choices"][0]["text"], echoed["choices"][0]["logprobs"]
    assert text == body["prompt"] + choice["text"]
    n_prompt = echoed["usage"]["prompt_tokens"]
    assert elp["token_logprobs"][0] is None and elp["top_logprobs"][0] is None
    assert len(elp["tokens"]) == n_prompt + n
    assert elp["text_offset"][:2] == [0, len("The ")]
    assert elp["text_offset"][n_prompt] == len(body["prompt"])

    streamed = _sse(_post(server, "/completions", {**body, "stream": True}, stream=True))
    assert streamed[-1] == "[DONE]"
    assert "".join(c["choices"][0]["text"] for c in streamed[:-1]) == choice["text"]


# ---- errors ----------------------------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/chat/completions", {"model": "gpt-9", "messages": HELLO}),
        ("/chat/completions", {"model": MINILM_NAME, "messages": HELLO}),
        ("/completions", {"model": "gpt-9", "prompt": "hi"}),
        ("/embeddings", {"model": CHAT, "input": "hi"}),
    ],
)
def test_unknown_model_is_404(server: LocalProviderServer, path: str, body: dict) -> None:
    resp = _post(server, path, body)
    assert resp.status_code == 404
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "model_not_found"
    assert body["model"] in error["message"]


@pytest.mark.timeout(30)
def test_prompt_longer_than_context_is_400(server: LocalProviderServer) -> None:
    long_text = " ".join(["interpretability"] * 300)
    for path, body in [
        ("/chat/completions", {"messages": [{"role": "user", "content": long_text}]}),
        ("/completions", {"prompt": long_text}),
        ("/completions", {"prompt": "short", "max_tokens": 1000}),
    ]:
        resp = _post(server, path, {"model": CHAT, **body})
        assert resp.status_code == 400, path
        assert resp.json()["error"]["code"] == "context_length_exceeded"


# ---- faults, limits, auth --------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_sliding_window_rate_limit() -> None:
    with LocalProviderServer(ServerOptions(rate_limit_rps=5)) as srv:

        def fire(_: int) -> requests.Response:
            return requests.get(srv.base_url + "/models", timeout=10)

        with ThreadPoolExecutor(4) as pool:
            responses = list(pool.map(fire, range(20)))
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 429} and codes.count(429) >= 5
        rejected = [r for r in responses if r.status_code == 429]
        for r in rejected:
            assert int(r.headers["Retry-After"]) >= 1
            assert r.headers["x-ratelimit-reset-requests"].endswith("s")
            assert r.json()["error"]["code"] == "rate_limit_exceeded"
        stats = requests.get(srv.root_url + "/stats", timeout=10).json()
        assert 1 <= stats["max_accepted_in_1s"] <= 5
        # a 429 comes when 5 were accepted in the last second: it is at least the 6th sent
        assert stats["max_sent_in_1s"] >= 6 and stats["max_accepted_in_1s"] <= 5
        assert stats["first_unix_s"] <= stats["last_ok_unix_s"]
        assert stats["n_429"] == len(rejected) and stats["by_status"]["429"] == len(rejected)
        assert len(stats["recent"]) == 20

        time.sleep(float(rejected[-1].headers["x-ratelimit-reset-requests"][:-1]) + 0.05)
        assert fire(0).status_code == 200
        requests.post(srv.root_url + "/stats/reset", timeout=10)
        assert requests.get(srv.root_url + "/stats", timeout=10).json()["n_requests"] == 0


@pytest.mark.timeout(30)
def test_faults_endpoint_forces_429_with_retry_after() -> None:
    with LocalProviderServer(ServerOptions()) as srv:
        change = {"next_429s": 2, "retry_after_s": 2}
        resp = requests.post(srv.root_url + "/faults", json=change, timeout=10)
        assert resp.status_code == 200 and resp.json()["next_429s"] == 2
        first, second, third = (
            requests.get(srv.base_url + "/models", timeout=10) for _ in range(3)
        )
        assert (first.status_code, second.status_code, third.status_code) == (429, 429, 200)
        assert first.headers["Retry-After"] == "2"
        bad = requests.post(srv.root_url + "/faults", json={"no_such_knob": 1}, timeout=10)
        assert bad.status_code == 400 and "no_such_knob" in bad.json()["error"]["message"]
        for value, status in ((1, 400), ("yes", 400), (True, 200)):
            resp = requests.post(
                srv.root_url + "/faults", json={"echo_authorization": value}, timeout=10
            )
            assert resp.status_code == status, (value, resp.text)
        assert resp.json()["echo_authorization"] is True


@pytest.mark.timeout(30)
def test_api_key_is_required_and_never_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "sk-local-test-4f1c9e"
    monkeypatch.setenv("INTERPQ_TEST_LOCAL_KEY", secret)
    caplog.set_level(logging.DEBUG, logger="interpq.providers")
    with LocalProviderServer(ServerOptions(api_key_env="INTERPQ_TEST_LOCAL_KEY")) as srv:
        url = srv.base_url + "/models"
        missing = requests.get(url, timeout=10)
        wrong = requests.get(url, headers={"Authorization": "Bearer sk-wrong"}, timeout=10)
        right = requests.get(url, headers={"Authorization": f"Bearer {secret}"}, timeout=10)
        assert requests.get(srv.root_url + "/health", timeout=10).status_code == 200
    assert (missing.status_code, wrong.status_code, right.status_code) == (401, 401, 200)
    assert missing.json()["error"]["code"] == "invalid_api_key"
    assert secret not in caplog.text and "Authorization" not in caplog.text
    assert "GET /v1/models 401" in caplog.text


@pytest.mark.timeout(30)
def test_error_rate_one_gives_5xx() -> None:
    with LocalProviderServer(ServerOptions(error_rate=1.0, seed=3)) as srv:
        responses = [requests.get(srv.base_url + "/models", timeout=10) for _ in range(6)]
    assert all(r.status_code in (500, 502, 503) for r in responses)
    assert all(r.json()["error"]["type"] == "server_error" for r in responses)


@pytest.mark.timeout(30)
def test_timeout_rate_hangs_and_latency_delays() -> None:
    with LocalProviderServer(ServerOptions(timeout_rate=1.0, hang_s=20)) as srv:
        with pytest.raises(requests.exceptions.ReadTimeout):
            requests.get(srv.base_url + "/models", timeout=0.3)
        started = time.monotonic()
    assert time.monotonic() - started < 5  # stop() wakes the hanging request

    with LocalProviderServer(ServerOptions(added_latency_ms=200)) as srv:
        started = time.monotonic()
        assert requests.get(srv.base_url + "/models", timeout=10).status_code == 200
        assert time.monotonic() - started >= 0.2


# ---- command line ----------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_parser_maps_flags_to_options() -> None:
    args = build_parser().parse_args(
        ["--port", "0", "--rate-limit-rps", "5", "--error-rate", "0.1", "--retry-after-s", "2"]
    )
    options = options_from_args(args)
    assert (options.rate_limit_rps, options.error_rate, options.retry_after_s) == (5.0, 0.1, 2.0)
    with pytest.raises(ValueError, match="error_rate"):
        ServerOptions(error_rate=1.5)


@pytest.mark.timeout(45)
def test_module_entry_point_serves_until_sigterm() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "interpq.providers.local.server",
            "--port",
            "0",
            "--torch-threads",
            "1",
        ],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        base_url = proc.stdout.readline().strip()
        assert base_url.startswith("http://127.0.0.1:") and base_url.endswith("/v1")
        names = [m["id"] for m in requests.get(base_url + "/models", timeout=10).json()["data"]]
        assert CHAT in names
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=15)
        assert proc.returncode == 0
        assert f"serving on {base_url}" in stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.timeout(10)
def test_retry_after_rounds_up_to_whole_seconds() -> None:
    assert [retry_after_header(s) for s in (0.0, 0.35, 1.0, 1.2)] == ["1", "1", "1", "2"]


def _script(srv: LocalProviderServer, body: dict) -> requests.Response:
    return requests.post(f"{srv.root_url}/script", json=body, timeout=10)


def test_scripted_chat_answers_in_turn_then_falls_through(server: LocalProviderServer) -> None:
    script = {"rules": [
        {"match": "Latent explanation", "replies": ["[1,0]"]},
        {"match": r"^\nExample 1:", "model": "judge", "replies": ["oops", "[EXPLANATION]: x"],
         "repeat": False},
    ]}  # fmt: skip
    assert _script(server, script).status_code == 200

    def ask(model: str, content: str, **kw: object) -> requests.Response:
        body = {"model": model, "messages": [{"role": "user", "content": content}], **kw}
        return _post(server, "/chat/completions", body)

    def text(resp: requests.Response) -> str:
        return resp.json()["choices"][0]["message"]["content"]

    try:
        assert text(ask("judge", "\nExample 1: a")) == "oops"
        assert text(ask("judge", "\nExample 1: a")) == "[EXPLANATION]: x"
        assert ask("judge", "\nExample 1: a").status_code == 404  # used up, no LM of that name
        assert text(ask("anything", "Latent explanation: y")) == "[1,0]"
        streamed = ask("judge", "Latent explanation: y", stream=True,
                       stream_options={"include_usage": True})  # fmt: skip
        events = _sse(streamed)
        assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 2
        assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-2]) == "[1,0]"
        got = requests.get(f"{server.root_url}/script", timeout=5).json()["rules"]
        assert [r["hits"] for r in got] == [2, 2]
        bad = _script(server, {"rules": [{"match": "(", "replies": ["a"]}]})
        assert bad.status_code == 400 and "rules[0].match" in bad.json()["error"]["message"]
    finally:
        _script(server, {"rules": []})
