"""The deployment files, checked without a Docker engine.

``docker-compose.yml`` is validated against the Compose Specification's JSON schema (vendored
in ``tests/data/compose_spec/`` with its license note), then against what the deployment
promises: scalable workers, healthchecks behind every ``service_healthy`` condition, secrets
only as ``${VAR}`` references documented in ``.env.example``, exec-form commands so SIGTERM
reaches Celery, and a schedule the scheduler accepts.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[1]
SCHEMA = Path(__file__).parent / "data" / "compose_spec" / "compose-spec.json"
SCALABLE = ("worker-api", "worker-compute", "worker-gpu")
_REF = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
_ONLY_REF = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*(:?[-?][^}]*)?\}$")
_SECRET_KEY = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY|AUTH", re.IGNORECASE)


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """Compose's interpolation for the forms used here: ``${V}``, ``${V:-d}``, ``${V:?e}``, ``$$``."""
    env = env or {}

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if name in env and (env[name] or op not in (":-", ":?")):
            return env[name]
        if op in (":-", "-"):
            return arg
        if op in (":?", "?"):
            raise KeyError(f"{name}: {arg}")
        return ""

    return _REF.sub(sub, value).replace("$$", "$")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


def _strings(node: Any, path: str = "") -> list[tuple[str, str]]:
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in _strings(v, f"{path}.{k}")]
    if isinstance(node, list):
        return [s for i, v in enumerate(node) for s in _strings(v, f"{path}[{i}]")]
    return [(path, node)] if isinstance(node, str) else []


def test_compose_file_follows_the_compose_specification(compose: dict[str, Any]) -> None:
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, [f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors]
    broken = copy.deepcopy(compose)  # the schema has teeth: a misspelt key is refused
    broken["services"]["worker-api"]["stop_grace_periode"] = "2m"
    assert not validator.is_valid(broken)


def test_services_of_the_deployment_are_all_there(services: dict[str, Any]) -> None:
    assert set(services) >= {"redis", "postgres", "migrate", "scheduler", "flower", *SCALABLE}
    assert services["worker-gpu"]["profiles"] == ["gpu"]
    assert all("profiles" not in s for n, s in services.items() if n != "worker-gpu")


def test_scalable_workers_have_no_container_name_and_shut_down_warm(
    services: dict[str, Any],
) -> None:
    for name in SCALABLE:
        svc = services[name]
        assert "container_name" not in svc, name
        assert svc.get("stop_signal", "SIGTERM") == "SIGTERM", name
        grace = svc["stop_grace_period"]
        assert re.fullmatch(r"\d+[sm]", grace), (name, grace)
        assert int(grace[:-1]) * (60 if grace.endswith("m") else 1) >= 60, (name, grace)
        assert "artifacts:/artifacts" in svc["volumes"], name
        assert svc["environment"]["INTERPQ_ARTIFACTS_DIR"] == "/artifacts"
    assert services["worker-api"]["command"][:3] == ["worker", "-Q", "api"]
    for name in ("worker-compute", "worker-gpu"):
        assert services[name]["command"][:3] == ["worker", "-Q", "compute"], name
    assert "container_name" not in services["scheduler"]


def test_every_command_is_exec_form(services: dict[str, Any]) -> None:
    for name, svc in services.items():
        for key in ("command", "entrypoint"):
            if key in svc:
                assert isinstance(svc[key], list), f"{name}.{key} must be a list (exec form)"
        if "healthcheck" in svc:
            assert svc["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL"), name


def test_dockerfile_entrypoint_and_cmd_are_exec_form() -> None:
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    found = {}
    for line in lines:
        word, _, rest = line.strip().partition(" ")
        if word in ("ENTRYPOINT", "CMD"):
            found[word] = json.loads(rest)  # shell form would not parse as a JSON array
    assert found["ENTRYPOINT"] == ["interpq"]
    assert isinstance(found["CMD"], list)


def test_healthchecks_and_dependency_conditions(services: dict[str, Any]) -> None:
    assert "healthcheck" in services["redis"] and "healthcheck" in services["postgres"]
    for name, svc in services.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert cond["condition"] in ("service_healthy", "service_completed_successfully")
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits on {dep}'s health"
    worker_deps = {
        "redis": "service_healthy",
        "postgres": "service_healthy",
        "migrate": "service_completed_successfully",
    }
    for name in SCALABLE:
        conds = {d: c["condition"] for d, c in services[name]["depends_on"].items()}
        assert conds == worker_deps, name
    assert services["migrate"]["command"] == ["db", "upgrade"]
    assert services["migrate"]["restart"] == "no"
    assert services["scheduler"]["depends_on"]["migrate"] == {
        "condition": "service_completed_successfully"
    }


def test_redis_persists_refuses_eviction_and_needs_a_password(services: dict[str, Any]) -> None:
    cmd = services["redis"]["command"]
    flags = dict(zip(cmd[1::2], cmd[2::2], strict=True))
    assert flags["--appendonly"] == "yes"
    assert flags["--maxmemory-policy"] == "noeviction"
    assert _ONLY_REF.match(flags["--requirepass"])
    assert "redis-data:/data" in services["redis"]["volumes"]
    assert any(v.endswith(":/var/lib/postgresql/data") for v in services["postgres"]["volumes"])


def test_no_secret_values_in_the_compose_file(compose: dict[str, Any]) -> None:
    for path, value in _strings(compose):
        key = path.rsplit(".", 1)[-1]
        if _SECRET_KEY.search(key):
            assert _ONLY_REF.match(value), f"{path} holds a value; use a ${{VAR}} from .env"
        for userinfo in re.findall(r"://([^@/\s]*)@", value):  # credentials inside URLs
            _, _, password = userinfo.partition(":")
            assert not password or _ONLY_REF.match(password), f"{path}: password in a URL"
    text = (ROOT / "docker-compose.yml").read_text()
    assert not re.search(r"sk-[A-Za-z0-9]{8,}|change-this", text)
    for name in ("worker-api", "worker-compute", "worker-gpu", "scheduler"):
        assert compose["services"][name]["env_file"] == [".env"]
    for name in ("migrate", "flower"):  # no provider keys where none are needed
        assert compose["services"][name]["env_file"] == [], name
        assert not any("API_KEY" in k for k in compose["services"][name]["environment"]), name
    ignored = (ROOT / ".gitignore").read_text().split()
    assert ".env" in ignored


def test_env_example_documents_every_variable_and_holds_no_secret(
    compose: dict[str, Any],
) -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    used = {m.group(1) for m in _REF.finditer(text)}
    example = (ROOT / ".env.example").read_text()
    documented = dict(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=(.*)$", example, re.MULTILINE))
    assert used - set(documented) == set(), "document these in .env.example"
    for name, value in documented.items():
        if _SECRET_KEY.search(name):
            assert value in ("", "change-this") or value.startswith("YOUR_"), name
        for userinfo in re.findall(r"://([^@/\s]*)@", value):
            assert userinfo.partition(":")[2] in ("", "change-this"), name


def test_flower_has_basic_auth_and_is_published_on_localhost(services: dict[str, Any]) -> None:
    flower = services["flower"]
    assert flower["command"][0] == "flower"
    env = flower["environment"]
    assert _ONLY_REF.match(env["INTERPQ_FLOWER_PASSWORD"])
    assert ":?" in env["INTERPQ_FLOWER_PASSWORD"], "Flower must not start without a password"
    for name in ("flower", "redis", "postgres"):
        for port in services[name]["ports"]:
            assert interpolate(port).startswith("127.0.0.1:"), (name, port)


def test_gpu_worker_reserves_gpus(services: dict[str, Any]) -> None:
    gpu = services["worker-gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia"
    assert gpu["build"]["args"]["TORCH"] == "torch"
    assert gpu["image"] != services["worker-api"]["image"]


def test_scheduler_schedule_is_accepted_by_interpq_beat(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    from interpq.providers.config import load_providers
    from interpq.scheduler.periodic import load_schedule
    from interpq.settings import Settings

    cmd = compose["services"]["scheduler"]["command"]
    assert cmd[0] == "beat"
    target = cmd[cmd.index("--schedule") + 1]
    (mount,) = [c for c in compose["services"]["scheduler"]["configs"] if c["target"] == target]
    content = interpolate(compose["configs"][mount["source"]]["content"])
    path = tmp_path / "schedule.yaml"
    path.write_text(content)
    (entry,) = load_schedule(path, load_providers(Settings()))
    assert entry.every == "1h" and entry.batch["jobs"][0]["models"] == "all"


def _seconds(duration: str) -> int:
    return int(duration[:-1]) * (60 if duration.endswith("m") else 1)


def test_compute_workers_soft_shut_down_before_their_grace_period_ends(
    services: dict[str, Any],
) -> None:
    from interpq.settings import Settings

    for name in ("worker-compute", "worker-gpu"):
        env = services[name]["environment"]
        assert env["REMAP_SIGTERM"] == "SIGQUIT", name
        soft_s = Settings(soft_shutdown_timeout_s=env["INTERPQ_SOFT_SHUTDOWN_TIMEOUT_S"])
        grace_s = _seconds(services[name]["stop_grace_period"])
        assert 0 < soft_s.soft_shutdown_timeout_s <= grace_s - 30, (name, soft_s, grace_s)
    # the thread pool cannot cancel a task: api workers keep Celery's warm shutdown
    assert "REMAP_SIGTERM" not in services["worker-api"]["environment"]


def test_workers_and_scheduler_read_the_mounted_providers_file(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    from interpq.providers.config import load_providers
    from interpq.settings import Settings

    sources = set()
    for name in ("worker-api", "worker-compute", "worker-gpu", "scheduler"):
        svc = compose["services"][name]
        target = svc["environment"]["INTERPQ_PROVIDERS"]
        (mount,) = [c for c in svc["configs"] if c["target"] == target]
        sources.add(mount["source"])
    (source,) = sources
    path = tmp_path / "providers.toml"
    path.write_text(interpolate(compose["configs"][source]["content"]))
    assert "holysheep" in load_providers(Settings(providers=path))  # presets kept
    for name in ("migrate", "flower"):
        assert "INTERPQ_PROVIDERS" not in compose["services"][name]["environment"], name
