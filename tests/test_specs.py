"""Specs, batch files, providers and keys: bad input is refused with one line naming the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from interpq.errors import MissingApiKey, SpecError
from interpq.providers.config import load_providers
from interpq.scheduler.client import _order_and_check, load_batch_file
from interpq.settings import Settings
from interpq.specs import Benchmark, Noop, SubmitContext, json_schema

pytestmark = pytest.mark.timeout(30)


def _ctx(tmp_path: Path | None = None) -> SubmitContext:
    return SubmitContext(providers=load_providers(Settings(providers=None)))


def test_presets_have_the_issue_prices() -> None:
    providers = load_providers(Settings(providers=None))
    assert set(providers) >= {"local", "openai", "deepseek", "holysheep"}
    hs = providers["holysheep"]
    assert hs.base_url == "https://api.holysheep.ai/v1"
    assert hs.api_key_env == "HOLYSHEEP_API_KEY"
    prices = {m: p.input_usd_per_mtok for m, p in hs.models.items()}
    assert prices == {
        "gpt-4.1": 8.00,
        "claude-sonnet-4.5": 15.00,
        "gemini-2.5-flash": 2.50,
        "deepseek-chat": 0.42,
    }
    assert hs.models["gpt-4.1"].cost_usd(1_000_000, 500_000) == pytest.approx(12.0)


def test_user_providers_file_merges_over_presets(tmp_path: Path) -> None:
    f = tmp_path / "providers.toml"
    f.write_text(
        "[providers.holysheep]\nrpm = 42\n"
        '[providers.mine]\nbase_url = "http://127.0.0.1:1/v1"\napi_key_env = "MINE_KEY"\n'
        "[providers.mine.models.m]\ninput_usd_per_mtok = 1.0\noutput_usd_per_mtok = 2.0\n"
    )
    providers = load_providers(Settings(providers=f))
    assert providers["holysheep"].rpm == 42
    assert "gpt-4.1" in providers["holysheep"].models  # preset models kept
    assert providers["mine"].models["m"].output_usd_per_mtok == 2.0


@pytest.mark.parametrize("value", [None, "", "YOUR_HOLYSHEEP_API_KEY", "<your key>", "changeme"])
def test_missing_or_placeholder_key_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    monkeypatch.chdir(Path(__file__).parent)  # no .env here
    if value is None:
        monkeypatch.delenv("HOLYSHEEP_API_KEY", raising=False)
    else:
        monkeypatch.setenv("HOLYSHEEP_API_KEY", value)
    spec = Benchmark(provider="holysheep", models=["gpt-4.1"])
    with pytest.raises(MissingApiKey) as info:
        spec.check(_ctx())
    msg = str(info.value)
    assert "HOLYSHEEP_API_KEY" in msg and "\n" not in msg
    with pytest.raises(SpecError, match=r"jobs\[0\] .*HOLYSHEEP_API_KEY"):
        _order_and_check([spec], _ctx())


def test_real_looking_key_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOLYSHEEP_API_KEY", "sk-live-0123456789abcdef")
    spec = Benchmark(provider="holysheep", models=["gpt-4.1", "deepseek-chat"])
    assert spec.check(_ctx()) is None  # no MissingApiKey
    _order_and_check([spec], _ctx())
    monkeypatch.setenv("HOLYSHEEP_API_KEY", "YOUR_HOLYSHEEP_API_KEY")  # the same, refused
    with pytest.raises(MissingApiKey):
        spec.check(_ctx())


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (Benchmark(provider="nope", models=["m"]), "provider"),
        (Benchmark(provider="local", models=["all-MiniLM-L6-v2", "gpt-9"]), r"models\[1\]"),
    ],
)
def test_submit_checks_name_the_field(spec: Benchmark, field: str) -> None:
    with pytest.raises(SpecError, match=rf"^jobs\[0\] \(\S+\)\.{field}: "):
        _order_and_check([spec], _ctx())


def test_references_must_resolve_and_not_cycle() -> None:
    a = Noop(name="a")
    b = Noop(name="b", after=[a])
    assert b.references() == ["a"]
    _order_and_check([a, b], _ctx())
    with pytest.raises(SpecError, match="refers to @a, which is not in this batch"):
        _order_and_check([b], _ctx())
    c1 = Noop(name="c1", after=["@c2"])
    c2 = Noop(name="c2", after=["@c1"])
    with pytest.raises(SpecError, match="cycle"):
        _order_and_check([c1, c2], _ctx())
    with pytest.raises(SpecError, match=r"jobs\[1\]\.name: 'a' is used by jobs\[0\]"):
        _order_and_check([a, Noop(name="a")], _ctx())


def test_batch_file_errors_are_one_line_naming_the_field(tmp_path: Path) -> None:
    f = tmp_path / "b.yaml"
    f.write_text(
        "name: x\njobs:\n  - kind: benchmark\n    provider: local\n"
        "    models: [all-MiniLM-L6-v2]\n    requests: 0\n"
    )
    with pytest.raises(SpecError) as info:
        load_batch_file(str(f))
    assert str(info.value).startswith(f"{f}: jobs[0].requests: ")
    assert "\n" not in str(info.value)
    f.write_text("jobs:\n  - kind: teleport\n")
    with pytest.raises(SpecError, match=r"jobs\[0\]"):
        load_batch_file(str(f))
    f.write_text("jobs: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_batch_file(str(f))


def test_batch_file_yaml_and_json_with_references(tmp_path: Path) -> None:
    data = {
        "name": "exp",
        "jobs": [
            {"kind": "noop", "name": "first"},
            {"kind": "noop", "name": "second", "after": ["@first"]},
        ],
    }
    (tmp_path / "b.json").write_text(json.dumps(data))
    spec = load_batch_file(str(tmp_path / "b.json"))
    assert spec.name == "exp" and spec.jobs[1].references() == ["first"]
    (tmp_path / "b.yml").write_text("- kind: noop\n- kind: noop\n  sleep_s: 0.1\n")
    spec = load_batch_file(str(tmp_path / "b.yml"))
    assert spec.name == "b" and len(spec.jobs) == 2


def test_json_schema_covers_every_kind() -> None:
    import jsonschema

    from interpq.specs import SPEC_TYPES
    from interpq.stack.demo import demo_jobs

    schema = json_schema()
    kinds = {
        "benchmark",
        "noop",
        "extract",
        "train_sae",
        "patch",
        "feature_records",
        "explain",
        "score",
    }
    assert set(schema["properties"]["jobs"]["items"]["discriminator"]["mapping"]) == kinds
    assert set(SPEC_TYPES) == kinds
    for kind, spec_type in SPEC_TYPES.items():
        props = schema["$defs"][spec_type.__name__]["properties"]
        assert props["kind"]["const"] == kind
    text = json.dumps(schema)
    assert "Requests in flight at once per model" in text  # field docstrings become descriptions
    # the demo's jobs (one of every kind but noop) and a noop, as a batch file holds them
    jobs = [j.model_dump(mode="json") for j in [*demo_jobs(4, 8), Noop(name="n")]]
    assert {j["kind"] for j in jobs} == kinds
    jsonschema.validate({"name": "all-kinds", "jobs": jobs}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "x", "jobs": [{"kind": "teleport"}]}, schema)


def test_benchmark_parts_cover_every_request_once() -> None:
    spec = Benchmark(provider="local", models=["a", "b"], requests=10, concurrency=3)
    assert spec.n_parts() == 6
    for model in ("a", "b"):
        indices = sorted(
            i
            for p in range(spec.n_parts())
            if spec.part_of(p)[0] == model
            for i in spec.request_indices(spec.part_of(p)[1])
        )
        assert indices == list(range(10))


def test_a_batch_the_broker_refuses_leaves_no_job_to_run(tmp_path: Path) -> None:
    """The broker answers but refuses the messages (a real Redis at its memory limit, with
    noeviction): every job of the batch is cancelled, and the error is one line."""
    import shutil
    import subprocess
    import tempfile
    import time

    from sqlalchemy import select

    from interpq.errors import EnqueueError
    from interpq.models import Job
    from interpq.scheduler.client import Client
    from interpq.stack.embedded import find_redis_server

    sockdir = tempfile.mkdtemp(prefix="iq-full-")
    sock = Path(sockdir) / "redis.sock"
    redis_proc = subprocess.Popen(
        [find_redis_server(), "--port", "0", "--unixsocket", str(sock), "--save", "",
         "--appendonly", "no", "--dir", sockdir, "--maxmemory", "1",
         "--maxmemory-policy", "noeviction"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert time.monotonic() < deadline, "redis did not start"
            time.sleep(0.02)
        client = Client(
            Settings(broker_url=f"redis+socket://{sock}",
                     database_url=f"sqlite:///{tmp_path / 'refused.db'}", providers=None)
        )  # fmt: skip
        a = Noop(name="a")
        with pytest.raises(EnqueueError) as info:
            client.submit([a, Noop(name="b", after=[a]), Noop(name="c")], name="refused")
    finally:
        redis_proc.terminate()
        redis_proc.wait(10)
        shutil.rmtree(sockdir, ignore_errors=True)
    msg = str(info.value)
    assert "\n" not in msg and "'refused'" in msg and "no job of it will run" in msg, msg
    with client.engine.connect() as conn:
        states = conn.execute(select(Job.name, Job.state, Job.error)).all()
    assert sorted((n, st) for n, st, _ in states) == [
        ("a", "cancelled"), ("b", "cancelled"), ("c", "cancelled"),
    ]  # fmt: skip
    assert all(e.startswith("not enqueued: ") and "\n" not in e for _, _, e in states)


def test_a_batch_is_not_stored_when_the_broker_is_unreachable(tmp_path: Path) -> None:
    import socket

    from interpq.errors import EnqueueError
    from interpq.scheduler.client import Client

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = Client(
        Settings(broker_url=f"redis://127.0.0.1:{port}/0",
                 database_url=f"sqlite:///{tmp_path / 'unreachable.db'}", providers=None)
    )  # fmt: skip
    with pytest.raises(EnqueueError, match="cannot reach the broker") as info:
        client.submit([Noop(name="a")], name="unreachable")
    assert "\n" not in str(info.value)
    assert client.batches() == []
