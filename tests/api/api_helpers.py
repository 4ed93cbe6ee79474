"""The API under test: services/api/run (uvicorn on loopback) and a worker, both with signed
messages on, keys made by `tasks.signing.generate_keys`, tokens made like the CLI makes them.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import REPO, VENV_BIN, Service, free_port, http_status, reset_database
from tasks.api.tokens import entry_for, new_token
from tasks.signing import env_for, generate_keys

SUPPORT = REPO / "tests" / "support"
EXTRA_TASKS = {"WAARDHAVEN_EXTRA_TASK_MODULES": "extra_tasks", "PYTHONPATH": str(SUPPORT)}

# name -> permissions. The matrix test walks every action against every token.
TOKENS: dict[str, dict[str, list[str]]] = {
    "admin": {"*": ["*"]},
    "reporting": {"generate_report": ["submit"], "*": ["read"]},
    "pinger": {"ping": ["submit", "read", "revoke"]},
    "indexer": {"compute_index": ["read"]},
    "burst": {"*": ["read"]},  # the rate-limit test spends this one's budget
}


@dataclass
class Stack:
    url: str
    tokens: dict[str, str]
    keys: Path
    worker: Service
    api: Service
    env: dict[str, str] = field(default_factory=dict)

    def client(self, token: str | None = "admin", **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.tokens[token]}"} if token else {}
        kwargs.setdefault("timeout", 30)
        return httpx.Client(base_url=self.url, headers=headers, **kwargs)

    def cli(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        """`waardhaven-tasks ...` with this stack's settings (signing keys included)."""
        return subprocess.run(
            [str(VENV_BIN / "waardhaven-tasks"), *args],
            env={**self.worker.env, **env},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )


def write_tokens(path: Path) -> dict[str, str]:
    tokens = {name: new_token() for name in TOKENS}
    entries = [entry_for(name, tokens[name], perms) for name, perms in TOKENS.items()]
    path.write_text(json.dumps({"tokens": entries}))
    return tokens


def start_api(tmp: Path, signing: dict[str, str]) -> tuple[Service, str]:
    """services/api/run with the tokens file in `tmp`, on a free port; (service, its URL) once
    /healthz answers."""
    port = free_port()
    api = Service(
        "api",
        tmp,
        API_PORT=str(port),
        API_ADDRESS="127.0.0.1",
        API_TOKENS_FILE=str(tmp / "tokens.json"),
        **signing,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while http_status(url + "/healthz") != 200:
        if api.proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"api did not start:\n{api.output[-3000:]}")
        time.sleep(0.2)
    return api, url


@pytest.fixture(scope="module", name="stack")
def stack_fixture(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    migrated_db: str,
    redis_server_flushed: None,
) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("api")
    keys = generate_keys(tmp / "keys")
    signing = env_for(keys)
    tokens = write_tokens(tmp / "tokens.json")
    reset_database()
    # Production settings where they matter here: PROGRESS_INTERVAL's default, the default
    # rate limit (API_RATE_LIMIT 120 per minute).
    worker = Service(
        "worker-high",
        tmp,
        WORKER_QUEUES="high_priority,low_priority,default",
        WORKER_CONCURRENCY="1",
        PROGRESS_INTERVAL="0.5",
        **EXTRA_TASKS,
        **signing,
        **getattr(request.module, "WORKER_ENV", {}),  # a test module's own settings
    ).wait_ready()
    api, url = start_api(tmp, signing)
    yield Stack(url, tokens, keys, worker, api, signing)
    api.stop()
    worker.stop()


@pytest.fixture(scope="module", name="redis_server_flushed")
def redis_server_flushed_fixture() -> None:
    import os

    import redis

    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    client.flushdb()
    client.close()


def wait_state(stack: Stack, task_id: str, states: set[str], timeout: float = 60) -> Any:
    """Poll the result backend (not the API: its rate limit is for clients)."""
    from tasks.celery_app import app

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        meta = app.backend.get_task_meta(task_id)
        if meta["status"] in states:
            return meta
        time.sleep(0.1)
    raise AssertionError(f"{task_id} not in {states} after {timeout}s: {meta['status']}")
