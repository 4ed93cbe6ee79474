"""A revoke stays a revoke for workers that start later (tasks.revokes): real Redis, the real
API (services/api/run) and CLI, real workers (services/worker-high/run), signed messages on.

Each test uses a queue of its own that no worker consumes until the test starts one."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from api_helpers import EXTRA_TASKS, redis_server_flushed_fixture, start_api, write_tokens

from conftest import VENV_BIN, Service, service_env
from tasks import revokes
from tasks.signing import env_for, generate_keys

__all__ = ["redis_server_flushed_fixture"]


@dataclass
class Api:
    url: str
    admin: str
    env: dict[str, str]  # signing keys and the test tasks, for the CLI and the workers

    def cli(self, *args: str) -> str:
        done = subprocess.run(
            [str(VENV_BIN / "waardhaven-tasks"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return done.stdout.strip()

    def mark(self, queue: str) -> tuple[str, str]:
        """Sends test.mark to `queue`: (task id, the Redis key it sets when it runs)."""
        key = f"test:mark:{uuid.uuid4().hex}"
        return self.cli("submit", "test.mark", "--arg", f"key={key}", "--queue", queue), key


@pytest.fixture(scope="module")
def api(
    tmp_path_factory: pytest.TempPathFactory, migrated_db: str, redis_server_flushed: None
) -> Iterator[Api]:
    """The API alone: no worker runs while the tests revoke."""
    tmp = tmp_path_factory.mktemp("revokes")
    signing = env_for(generate_keys(tmp / "keys"))
    tokens = write_tokens(tmp / "tokens.json")
    service, url = start_api(tmp, signing)
    yield Api(url, tokens["admin"], service_env("cli", tmp, **signing, **EXTRA_TASKS))
    service.stop()


def start_worker(start_service: Any, api: Api, queue: str) -> Service:
    service: Service = start_service(
        "worker-high", WORKER_QUEUES=queue, WORKER_CONCURRENCY="1", **api.env
    )
    return service.wait_ready()


def wait_state(task_id: str, states: set[str], timeout: float = 60) -> str:
    from tasks.celery_app import app

    deadline = time.monotonic() + timeout
    while True:
        state = str(app.backend.get_task_meta(task_id)["status"])
        if state in states or time.monotonic() > deadline:
            return state
        time.sleep(0.1)


def new_queue() -> str:
    return f"revokes-{uuid.uuid4().hex[:8]}"


def test_a_task_revoked_by_the_cli_before_its_worker_started_does_not_run(
    api: Api, start_service: Any, redis_client: Any
) -> None:
    queue = new_queue()
    revoked, revoked_key = api.mark(queue)
    api.cli("revoke", revoked)  # no worker hears the broadcast
    after, after_key = api.mark(queue)  # sent after it: taken after it from the queue
    worker = start_worker(start_service, api, queue)  # a pod that started after the revoke
    assert wait_state(after, {"SUCCESS", "FAILURE"}) == "SUCCESS", worker.output[-3000:]
    assert redis_client.get(after_key) == b"ran"
    assert wait_state(revoked, {"REVOKED", "SUCCESS", "FAILURE"}) == "REVOKED"
    assert redis_client.get(revoked_key) is None  # its effect never happened
    assert "revokes: 1 revoked task ids loaded (worker start)" in worker.output


def test_a_task_revoked_through_the_api_before_its_worker_started_does_not_run(
    api: Api, start_service: Any
) -> None:
    # The API revokes the tasks it sent (or that have a result): pings, on the default queue,
    # which no worker of this module consumes before this one.
    with httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {api.admin}"}) as c:
        revoked = c.post("/v1/tasks/ping").json()["id"]
        assert c.delete(f"/v1/tasks/{revoked}").status_code == 202
        after = c.post("/v1/tasks/ping").json()["id"]
    worker = start_worker(start_service, api, "default")
    assert wait_state(after, {"SUCCESS", "FAILURE"}) == "SUCCESS", worker.output[-3000:]
    assert wait_state(revoked, {"REVOKED", "SUCCESS", "FAILURE"}) == "REVOKED"
    from tasks.celery_app import app

    assert app.backend.get_task_meta(after)["result"] == "pong"
    assert app.backend.get_task_meta(revoked)["result"] != "pong"  # it never ran


def test_a_revoke_reaches_a_running_worker_by_broadcast(
    api: Api, start_service: Any, redis_client: Any
) -> None:
    queue = new_queue()
    worker = start_worker(start_service, api, queue)
    busy = api.cli("submit", "test.sleep", "--arg", "seconds=60", "--queue", queue)
    assert wait_state(busy, {"STARTED"}) == "STARTED"
    waiting, key = api.mark(queue)  # one task at a time: this one waits in the queue
    api.cli("revoke", waiting)
    # The worker read the record before this revoke: only the broadcast can tell it now.
    redis_client.delete(revokes.KEY)
    started = time.monotonic()
    api.cli("revoke", "--terminate", busy)  # SIGQUIT stops it in the pool child
    assert wait_state(busy, {"REVOKED", "SUCCESS", "FAILURE"}) == "REVOKED"
    assert time.monotonic() - started < 30  # stopped, not run to its end
    state = wait_state(waiting, {"REVOKED", "SUCCESS", "FAILURE"})
    assert state == "REVOKED", worker.output[-3000:]
    assert redis_client.get(key) is None


def test_an_expired_revoke_is_trimmed_and_not_loaded(
    api: Api, start_service: Any, redis_client: Any
) -> None:
    queue = new_queue()
    task_id, key = api.mark(queue)
    now = time.time()
    # Expired, still in the set (nothing recorded since): a starting worker must skip it.
    redis_client.delete(revokes.KEY)  # earlier tests' revokes
    redis_client.zadd(revokes.KEY, {task_id: now - 1})
    worker = start_worker(start_service, api, queue)
    assert wait_state(task_id, {"SUCCESS", "REVOKED", "FAILURE"}) == "SUCCESS"
    assert redis_client.get(key) == b"ran"
    assert "revokes: 0 revoked task ids loaded (worker start)" in worker.output
    # The next record trims it; the key lives as long as its newest member.
    revokes.record(redis_client, "later", 600, now=now)
    assert redis_client.zscore(revokes.KEY, task_id) is None
    assert set(revokes.unexpired(redis_client)) == {"later"}
    assert 590 <= redis_client.ttl(revokes.KEY) <= 601
    redis_client.delete(revokes.KEY)
