"""Settings: typed, from the environment, and a bad value names its variable."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tasks.settings import SettingsError, load_settings


def test_defaults_are_the_seeds_floor(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TASK_SOFT_TIME_LIMIT", "TASK_TIME_LIMIT", "RESULT_EXPIRES"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings()
    assert (settings.task_soft_time_limit, settings.task_time_limit) == (1500, 1800)
    assert settings.result_expires == 3600
    assert settings.worker_prefetch_multiplier == 1
    assert settings.worker_max_tasks_per_child == 50
    assert settings.visibility_timeout > settings.task_time_limit


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("TASK_TIME_LIMIT", "soon", "TASK_TIME_LIMIT"),
        ("WORKER_PREFETCH_MULTIPLIER", "0", "WORKER_PREFETCH_MULTIPLIER"),
        ("REDIS_URL", "http://localhost", "REDIS_URL"),
        ("MARKET_DATA_PROVIDER", "yahoo", "MARKET_DATA_PROVIDER"),
        ("SCHEDULE_COMPUTE_INDEX", "every hour", "SCHEDULE_COMPUTE_INDEX"),
        ("SCHEDULE_REFRESH_MARKET_DATA", "99 * * * *", "SCHEDULE_REFRESH_MARKET_DATA"),
        ("VISIBILITY_TIMEOUT", "60", "VISIBILITY_TIMEOUT must exceed TASK_TIME_LIMIT"),
        ("TASK_SOFT_TIME_LIMIT", "1900", "TASK_SOFT_TIME_LIMIT must be below"),
        ("LOG_LEVEL", "chatty", "LOG_LEVEL"),
    ],
)
def test_bad_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert message in str(caught.value)


def test_twelvedata_needs_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MARKET_DATA_PROVIDER", "twelvedata")
    monkeypatch.delenv("TWELVEDATA_API_KEY", raising=False)
    with pytest.raises(SettingsError, match="TWELVEDATA_API_KEY"):
        load_settings()


def test_a_worker_with_a_bad_setting_stops_at_start_naming_it() -> None:
    env = {"TASK_TIME_LIMIT": "-5", "PATH": ""}
    proc = subprocess.run(
        [sys.executable, "-c", "import tasks.celery_app"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "TASK_TIME_LIMIT" in proc.stderr
    assert "Traceback" not in proc.stderr  # a message, not a stack dump
