"""The global limiter against a real Redis: pacing, cool-downs, leases, budgets."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from interpq.providers.config import ModelPrice, Provider
from interpq.queue.connections import connect
from interpq.queue.limiter import BudgetExceeded, Limiter, snapshot

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def provider() -> Provider:
    name = f"p{uuid.uuid4().hex[:8]}"  # fresh keys per test
    return Provider(
        name=name, base_url="http://127.0.0.1:1/v1", rpm=600, tpm=60_000, max_concurrency=2,
        models={"m": ModelPrice(input_usd_per_mtok=1e6, output_usd_per_mtok=1e6),
                "slow": ModelPrice(input_usd_per_mtok=0, output_usd_per_mtok=0, rpm=60),
                "one": ModelPrice(input_usd_per_mtok=0, output_usd_per_mtok=0, max_concurrency=1)},
    )  # fmt: skip


def test_reservations_are_paced_at_the_limit(redis_url: str, provider: Provider) -> None:
    lim = Limiter(connect(redis_url), provider, safety_margin=1.0)
    waits = [lim.reserve("m", tokens=1) for _ in range(5)]
    # 600 rpm = one request per 100 ms: slots at 0, .1, .2, ... (minus the time spent reserving)
    for i, w in enumerate(waits):
        assert w == pytest.approx(0.1 * i, abs=0.02)


def test_tokens_per_minute_can_be_the_binding_limit(redis_url: str, provider: Provider) -> None:
    lim = Limiter(connect(redis_url), provider, safety_margin=1.0)
    first = lim.reserve("m", tokens=500)  # 60k tpm: 500 tokens take 0.5 s of budget
    second = lim.reserve("m", tokens=500)
    assert first == pytest.approx(0.0, abs=0.02)
    assert second == pytest.approx(0.5, abs=0.03)
    lim.reconcile("m", estimated=500, actual=100)  # the response used fewer: give back 0.4 s
    assert lim.reserve("m", tokens=1) == pytest.approx(0.6, abs=0.05)


def test_model_limits_apply_besides_the_providers(redis_url: str, provider: Provider) -> None:
    lim = Limiter(connect(redis_url), provider, safety_margin=1.0)
    assert lim.reserve("slow", 1) == pytest.approx(0.0, abs=0.02)
    assert lim.reserve("slow", 1) == pytest.approx(1.0, abs=0.03)  # 60 rpm for this model


def test_a_cool_down_delays_every_later_reservation(redis_url: str, provider: Provider) -> None:
    r = connect(redis_url)
    lim_a, lim_b = Limiter(r, provider), Limiter(connect(redis_url), provider)
    lim_a.cool_down("m", 1.0)
    assert lim_b.reserve("m", 1) == pytest.approx(1.0, abs=0.05)
    assert lim_b.cooldown_remaining("m") > 0.8
    assert "m" in " ".join(snapshot(r, provider.name)["cooldown_s"])
    t0 = time.monotonic()
    lim_b.wait_for_slot("m", 1)
    assert time.monotonic() - t0 >= 0.9


def test_concurrency_permits_block_and_expire(redis_url: str, provider: Provider) -> None:
    lim = Limiter(connect(redis_url), provider)
    held = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with lim.permit(lease_s=30):
            held.set()
            release.wait(10)

    threads = [threading.Thread(target=hold) for _ in range(2)]
    for t in threads:
        t.start()
    held.wait(5)
    time.sleep(0.1)
    assert snapshot(lim.r, provider.name)["in_flight"] == 2
    got_third = threading.Event()

    def third() -> None:
        with lim.permit(lease_s=30):
            got_third.set()

    t3 = threading.Thread(target=third)
    t3.start()
    assert not got_third.wait(0.5), "a third permit was granted beyond max_concurrency=2"
    release.set()
    assert got_third.wait(5)
    for t in [*threads, t3]:
        t.join(5)
    # a lease whose holder died comes back after its expiry
    zkey = f"interpq:limit:{provider.name}:leases"
    lim._acquire(keys=[zkey], args=["dead-1", 0.3, 2])
    lim._acquire(keys=[zkey], args=["dead-2", 0.3, 2])
    t0 = time.monotonic()
    with lim.permit(lease_s=5):
        waited = time.monotonic() - t0
    assert 0.2 <= waited < 2.0


def test_budget_refuses_the_call_that_would_pass_it(redis_url: str, provider: Provider) -> None:
    lim = Limiter(connect(redis_url), provider)
    batch = uuid.uuid4().hex
    lim.reserve_budget(batch, 0.6, budget_usd=1.0)
    with pytest.raises(BudgetExceeded, match="budget exceeded"):
        lim.reserve_budget(batch, 0.6, budget_usd=1.0)
    lim.settle_budget(batch, estimate_usd=0.6, actual_usd=0.2)  # it cost less than estimated
    lim.reserve_budget(batch, 0.6, budget_usd=1.0)


def _holds(
    lim: Limiter, model: str, lease_s: float = 30
) -> tuple[threading.Event, threading.Event]:
    """A thread holding one permit for ``model`` until the second event is set."""
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with lim.permit(lease_s=lease_s, model=model):
            held.set()
            release.wait(10)

    threading.Thread(target=hold, daemon=True).start()
    assert held.wait(5)
    return held, release


def _waits(lim: Limiter, model: str) -> tuple[threading.Thread, threading.Event]:
    """A thread asking for a permit for ``model``; the event is set once it has one."""
    got = threading.Event()

    def call() -> None:
        with lim.permit(lease_s=30, model=model):
            got.set()

    t = threading.Thread(target=call, daemon=True)
    t.start()
    return t, got


def test_a_models_max_concurrency_holds_besides_the_providers(
    redis_url: str, provider: Provider
) -> None:
    lim = Limiter(connect(redis_url), provider)
    _, release_one = _holds(lim, "one")  # "one" allows a single call in flight
    t, second_one = _waits(lim, "one")
    assert not second_one.wait(0.5), "a second call of 'one' ran beyond its max_concurrency=1"
    # the provider (max_concurrency=2) still has room for another model's call
    with lim.permit(lease_s=30, model="m"):
        assert snapshot(lim.r, provider.name)["in_flight"] == 2
    release_one.set()
    assert second_one.wait(5), "the waiting call was not woken when the permit came back"
    t.join(5)
    assert lim.r.zcard(f"interpq:limit:{provider.name}:one:leases") == 0


def test_a_full_provider_blocks_a_model_with_room(redis_url: str, provider: Provider) -> None:
    lim = Limiter(connect(redis_url), provider)
    releases = [_holds(lim, "m")[1] for _ in range(2)]  # the provider's 2 permits
    t, got = _waits(lim, "one")
    assert not got.wait(0.5), "a call ran beyond the provider's max_concurrency=2"
    # all or nothing: the waiting call took no lease of its model while it waited
    assert lim.r.zcard(f"interpq:limit:{provider.name}:one:leases") == 0
    releases[0].set()
    assert got.wait(5)
    releases[1].set()
    t.join(5)


def test_a_dead_holders_model_lease_expires(redis_url: str, provider: Provider) -> None:
    lim = Limiter(connect(redis_url), provider)
    keys = [f"interpq:limit:{provider.name}:leases", f"interpq:limit:{provider.name}:one:leases"]
    assert lim._acquire(keys=keys, args=["dead", 0.3, 2, 1]) in (b"ok", "ok")
    t0 = time.monotonic()
    with lim.permit(lease_s=5, model="one"):
        waited = time.monotonic() - t0
    assert 0.2 <= waited < 2.0


def test_snapshot_keeps_providers_apart(redis_url: str, provider: Provider) -> None:
    r = connect(redis_url)
    other = provider.model_copy(update={"name": provider.name + "x"})  # a name it prefixes
    Limiter(r, other).cool_down("m", 5.0)
    assert snapshot(r, provider.name)["cooldown_s"] == {}
    assert list(snapshot(r, other.name)["cooldown_s"]) == [f"{other.name}:m"]


def test_a_call_that_wakes_late_takes_a_new_slot(
    redis_url: str, provider: Provider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker starved of CPU wakes after its slot: it must not go late (it would bunch with
    the next slots and overrun a sliding window); it reserves again and waits for that one."""
    import interpq.queue.limiter as limiter_module

    lim = Limiter(connect(redis_url), provider, safety_margin=1.0)  # 100 ms per request
    assert lim.late_tolerance_s("m") == pytest.approx(0.05)
    lim.reserve("m", 1)  # the slot now is taken: the next call waits ~100 ms
    real_sleep = time.sleep
    sleeps: list[float] = []

    def starved_sleep(seconds: float) -> None:  # the first wake-up comes 150 ms late
        sleeps.append(seconds)
        real_sleep(seconds + (0.15 if len(sleeps) == 1 else 0.0))

    monkeypatch.setattr(limiter_module.time, "sleep", starved_sleep)
    lim.wait_for_slot("m", 1)
    monkeypatch.setattr(limiter_module.time, "sleep", real_sleep)
    assert sleeps[0] == pytest.approx(0.1, abs=0.03)
    # Woken at t ≈ 0.25 s for the slot at 0.1 s, the call reserved again: the slot at 0.25 s,
    # so the next one is 100 ms away. Had it gone late on its old slot, the clock would stand
    # at 0.2 s and the next call could go at once, 0 ms after this one.
    assert lim.reserve("m", 1) == pytest.approx(0.1, abs=0.04)


def test_a_clock_lives_as_long_as_the_slots_it_has_reserved(
    redis_url: str, provider: Provider
) -> None:
    """Calls queued more than the keys' 15-minute TTL ahead must not reset the clock (that
    would let the next calls burst)."""
    r = connect(redis_url)
    lim = Limiter(r, provider, safety_margin=1.0)
    lim.reserve("m", tokens=1_200_000)  # 60k tpm: 20 minutes of tokens ahead
    ttl_ms = r.pttl(f"interpq:limit:{provider.name}:tat_tok")
    assert ttl_ms > 20 * 60 * 1000
    assert lim.reserve("m", tokens=1) == pytest.approx(20 * 60, abs=1)


def test_a_held_permit_can_be_renewed(redis_url: str, provider: Provider) -> None:
    r = connect(redis_url)
    lim = Limiter(r, provider)
    key = f"interpq:limit:{provider.name}:leases"
    with lim.permit(lease_s=1) as renew:
        (first,) = r.zrange(key, 0, -1, withscores=True)
        time.sleep(0.6)
        renew()
        (renewed,) = r.zrange(key, 0, -1, withscores=True)
        assert renewed[0] == first[0] and renewed[1] == pytest.approx(first[1] + 0.6, abs=0.2)
        time.sleep(0.6)  # past the first expiry: what every acquirer prunes keeps ours
        sec, usec = r.time()
        r.zremrangebyscore(key, "-inf", sec + usec / 1e6)
        assert r.zcard(key) == 1
    assert r.zcard(key) == 0
