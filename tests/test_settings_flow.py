"""``Client(settings=...)`` is honoured by everything it touches, whatever the environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from interpq import Benchmark, Client, EnqueueError
from interpq.queue.app import get_app
from interpq.settings import Settings

pytestmark = pytest.mark.timeout(60)


def test_a_clients_own_settings_reach_providers_database_and_broker_app(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("INTERPQ_BROKER_URL", "INTERPQ_PROVIDERS", "INTERPQ_VISIBILITY_TIMEOUT_S"):
        monkeypatch.delenv(name, raising=False)
    providers = tmp_path / "providers.toml"
    providers.write_text(
        '[providers.mine]\nbase_url = "http://127.0.0.1:9/v1"\nrpm = 60\n'
        "[providers.mine.models.m1]\ninput_usd_per_mtok = 0.0\noutput_usd_per_mtok = 0.0\n"
    )
    url = "redis://127.0.0.1:9/15"  # nothing listens there
    settings = Settings(broker_url=url, database_url=f"sqlite:///{tmp_path / 'own.db'}",
                        providers=providers, visibility_timeout_s=77)  # fmt: skip
    client = Client(settings)
    job = Benchmark(provider="mine", models=["m1"], requests=1)  # known only to its file
    with pytest.raises(EnqueueError, match="cannot reach the broker at redis://127.0.0.1:9/15"):
        client.submit([job], name="own")
    assert client.batches() == [] and (tmp_path / "own.db").is_file()  # its own database
    conf = get_app(url).conf
    assert conf.broker_url == url
    assert conf.broker_transport_options["visibility_timeout"] == 77
