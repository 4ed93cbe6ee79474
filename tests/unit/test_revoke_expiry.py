"""Revokes recorded in Redis (tasks.revokes): how long they are kept, and how a worker's
in-memory set (Celery's own LimitedSet) is made to forget each at its own time."""

from __future__ import annotations

import pytest
from celery.utils.collections import LimitedSet

from tasks import revokes
from tasks.celery_app import build_config
from tasks.settings import load_settings


def test_by_default_a_revoke_lasts_as_long_as_beats_longest_expires(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("VISIBILITY_TIMEOUT", "RESULT_EXPIRES"):
        monkeypatch.delenv(name, raising=False)
    conf = build_config(load_settings())
    beat = max(e["options"]["expires"] for e in conf["beat_schedule"].values())
    assert beat == 12 * 3600  # the weekly cleanup's
    assert revokes.ttl(conf) == beat > conf["broker_transport_options"]["visibility_timeout"]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"VISIBILITY_TIMEOUT": "86400"}, 86400),  # redeliveries come back later than beat's
        ({"RESULT_EXPIRES": "172800"}, 172800),  # results are kept longer
    ],
)
def test_the_longest_candidate_wins(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: int
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert revokes.ttl(build_config(load_settings())) == expected


def test_each_id_expires_from_the_worker_set_at_its_own_time() -> None:
    # Celery's worker set: 3 h per item, counted from its monotonic stamp.
    revoked = LimitedSet(maxlen=100, expires=10800)
    wall, mono = 1_800_000_000.0, 5_000.0
    revokes.add_until(revoked, {"soon": wall + 100, "late": wall + 43200}, wall, mono)
    revoked.purge(now=mono + 99)
    assert {"soon", "late"} <= set(revoked)
    revoked.purge(now=mono + 101)
    assert "soon" not in revoked and "late" in revoked
    revoked.purge(now=mono + 43199)  # beyond the set's own 3 h: the record's expiry counts
    assert "late" in revoked
    revoked.purge(now=mono + 43201)
    assert "late" not in revoked
