"""Walk the Celery configuration: the defects of the original app must not come back.

The original routed and scheduled dotted names that matched no registered task, so routing
never applied and beat sent unknown tasks.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from celery.schedules import crontab

from tasks.celery_app import QUEUES, ROUTES, app
from tasks.devstack import worker_pools

REPO = Path(__file__).resolve().parents[2]
PUBLIC_TASKS = {"refresh_market_data", "compute_index", "generate_report", "cleanup_old_data"}


@pytest.fixture(scope="module")
def registered() -> set[str]:
    app.loader.import_default_modules()
    return {name for name in app.tasks if not name.startswith("celery.")}


def test_every_task_has_a_route_and_every_route_a_task(registered: set[str]) -> None:
    assert registered >= PUBLIC_TASKS
    assert set(ROUTES) == registered


@pytest.mark.parametrize(
    ("task", "queue"),
    [
        ("refresh_market_data", "high_priority"),
        ("compute_index", "high_priority"),
        ("generate_report", "low_priority"),
        ("cleanup_old_data", "low_priority"),
        ("ping", "default"),
    ],
)
def test_router_sends_each_task_to_its_queue(task: str, queue: str) -> None:
    route = app.amqp.router.route({}, task)
    assert route["queue"].name == queue


def test_every_beat_entry_names_a_registered_task_on_its_queue(registered: set[str]) -> None:
    schedule = app.conf.beat_schedule
    assert {e["task"] for e in schedule.values()} == {
        "refresh_market_data",
        "compute_index",
        "cleanup_old_data",
    }
    for entry in schedule.values():
        assert entry["task"] in registered
        assert entry["options"]["queue"] == ROUTES[entry["task"]]
        assert entry["options"]["expires"] > 0
        assert isinstance(entry["schedule"], crontab)


def test_every_queue_is_consumed_by_one_worker_pool() -> None:
    """The chart's `workers` map (values.yaml) is the one source of the pools: it consumes
    exactly the app's queues, each in one pool; make run starts the same pools."""
    pools = worker_pools()
    consumed = [q for pool in pools.values() for q in pool["queues"].split(",")]
    assert sorted(consumed) == sorted(QUEUES)
    assert set(app.amqp.queues) == set(QUEUES)
    assert set(ROUTES.values()) | {app.conf.task_default_queue} == set(QUEUES)


def test_worker_services_share_one_run_script() -> None:
    """services/worker-<pool>/ hold only their defaults (env) and links to services/worker/;
    a pool's env file names the queues the chart gives that pool."""
    pools = worker_pools()
    for folder in sorted((REPO / "services").glob("worker-*")):
        assert sorted(f.name for f in folder.iterdir()) == ["env", "healthcheck", "run"]
        for script in ("run", "healthcheck"):
            assert (folder / script).is_symlink()
            assert (folder / script).resolve() == REPO / "services" / "worker" / script
        env = dict(
            line.split("=", 1)
            for line in (folder / "env").read_text().splitlines()
            if line and not line.startswith("#")
        )
        pool = next(p for p in pools.values() if p["service"] == folder.name)
        assert env["WORKER_QUEUES"] == pool["queues"]


def test_production_settings() -> None:
    conf = app.conf
    assert conf.task_serializer == conf.result_serializer == "json"
    assert conf.accept_content == ["json"] and conf.result_accept_content == ["json"]
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.worker_max_tasks_per_child == 50
    assert (conf.task_soft_time_limit, conf.task_time_limit) == (1500, 1800)
    assert conf.result_expires == 3600
    assert conf.task_track_started
    assert conf.broker_connection_retry_on_startup
    assert conf.worker_cancel_long_running_tasks_on_connection_loss
    assert conf.worker_send_task_events and conf.task_send_sent_event
    for options in (conf.broker_transport_options, conf.result_backend_transport_options):
        assert options["visibility_timeout"] > conf.task_time_limit
    assert conf.worker_soft_shutdown_timeout > 0
    assert conf.beat_max_loop_interval < conf.redbeat_lock_timeout
