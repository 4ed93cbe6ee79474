"""The HTTP API end to end: services/api/run (uvicorn on loopback), a real worker, Redis and
PostgreSQL, signed messages on. Tokens as the CLI makes them (api_helpers.TOKENS)."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from typing import Any

import httpx
import pytest
from api_helpers import TOKENS, Stack, redis_server_flushed_fixture, stack_fixture, wait_state
from sqlalchemy import text

from tasks.db import get_engine
from tasks.settings import Settings

__all__ = ["redis_server_flushed_fixture", "stack_fixture"]  # the fixtures


def submitted(stack: Stack, name: str = "ping", body: Any = None) -> str:
    with stack.client() as client:
        response = client.post(f"/v1/tasks/{name}", json=body)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


# --- tokens and permissions -----------------------------------------------------------------


def test_no_token_bad_token_and_a_malformed_header_are_401(stack: Stack) -> None:
    with httpx.Client(base_url=stack.url) as client:
        for headers in (
            {},
            {"Authorization": "Bearer wht_not-a-token"},
            {"Authorization": f"Bearer {stack.tokens['admin']}x"},
            {"Authorization": f"Basic {stack.tokens['admin']}"},
            {"Authorization": stack.tokens["admin"]},
        ):
            response = client.post("/v1/tasks/ping", headers=headers)
            assert response.status_code == 401, headers
            assert response.headers["www-authenticate"] == "Bearer"
            assert client.get("/v1/queues", headers=headers).status_code == 401
    assert "refused: invalid bearer token" in stack.api.output


# token -> expected status per action on a ping task the admin submitted.
MATRIX: dict[str, dict[str, int]] = {
    "admin": {"submit": 202, "read": 200, "events": 200, "revoke": 202, "queues": 200},
    "reporting": {"submit": 403, "read": 200, "events": 200, "revoke": 403, "queues": 200},
    "pinger": {"submit": 202, "read": 200, "events": 200, "revoke": 202, "queues": 403},
    "indexer": {"submit": 403, "read": 403, "events": 403, "revoke": 403, "queues": 403},
}


def act(client: httpx.Client, action: str, task_id: str) -> int:
    if action == "submit":
        return client.post("/v1/tasks/ping").status_code
    if action == "read":
        return client.get(f"/v1/tasks/{task_id}").status_code
    if action == "events":
        with client.stream("GET", f"/v1/tasks/{task_id}/events") as response:
            return response.status_code
    if action == "revoke":
        return client.delete(f"/v1/tasks/{task_id}").status_code
    return client.get("/v1/queues", params={"timeout": 0.5}).status_code


@pytest.mark.parametrize("token", list(MATRIX))
def test_permission_matrix(stack: Stack, token: str) -> None:
    task_id = submitted(stack)
    wait_state(stack, task_id, {"SUCCESS"})
    with stack.client(token) as client:
        got = {action: act(client, action, task_id) for action in MATRIX[token]}
    assert got == MATRIX[token]


def test_a_reporting_token_submits_generate_report_and_nothing_else(stack: Stack) -> None:
    with stack.client("reporting") as client:
        response = client.post("/v1/tasks/generate_report", json={"period_days": 30})
        assert response.status_code == 202
        denied = client.post("/v1/tasks/refresh_market_data", json={})
        assert denied.status_code == 403
        assert "may not submit task 'refresh_market_data'" in denied.json()["detail"]
    task_id = response.json()["id"]
    wait_state(stack, task_id, {"SUCCESS", "FAILURE"})  # no index yet: it fails, that is fine
    with get_engine().connect() as conn:
        requested_by = conn.execute(
            text("SELECT requested_by FROM task_runs WHERE task_id = :id"), {"id": task_id}
        ).scalar_one()
    assert requested_by == "api:reporting"
    assert f"token reporting submitted generate_report[{task_id}]" in stack.api.output


def test_tasks_the_api_does_not_know_need_a_wildcard_permission(stack: Stack) -> None:
    # Sent by the CLI: the API has no record of its name, only `*` covers it.
    task_id = stack.cli("submit", "test.sleep", "--arg", "seconds=0").stdout.strip()
    wait_state(stack, task_id, {"SUCCESS"})
    with stack.client("pinger") as client:
        assert client.get(f"/v1/tasks/{task_id}").status_code == 403
    with stack.client("admin") as client:
        assert client.get(f"/v1/tasks/{task_id}").json()["state"] == "SUCCESS"
        assert client.get(f"/v1/tasks/{uuid.uuid4()}").status_code == 404


def test_the_rate_limit_is_per_token(stack: Stack) -> None:
    limit = Settings().api_rate_limit  # the production default: 120 per minute
    with stack.client("burst") as client:
        codes = [client.get("/v1/tasks/nonexistent").status_code for _ in range(limit)]
        assert set(codes) == {404}
        refused = client.get("/v1/tasks/nonexistent")
    assert refused.status_code == 429
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    with stack.client("admin") as client:  # another token is not affected
        assert client.get("/v1/tasks/nonexistent").status_code == 404


# --- bodies ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"mode": "everything"}, "mode"),
        ({"symbols": "AAPL"}, "symbols"),
        ({"symbols": []}, "symbols"),
        ({"nonsense": 1}, "nonsense"),
        ([1, 2], "body"),
    ],
)
def test_bad_arguments_are_422_naming_the_field_and_nothing_is_sent(
    stack: Stack, redis_client: Any, body: Any, field: str
) -> None:
    sent_before = stack.api.output.count("submitted refresh_market_data")
    with stack.client() as client:
        response = client.post("/v1/tasks/refresh_market_data", json=body)
    assert response.status_code == 422
    assert response.json()["detail"][0]["field"] == field
    assert stack.api.output.count("submitted refresh_market_data") == sent_before
    assert redis_client.llen("high_priority") == 0


def test_strict_types_of_the_task_models_apply(stack: Stack) -> None:
    with stack.client() as client:
        bad = client.post("/v1/tasks/cleanup_old_data", json={"days_to_keep": "30"})
        good = client.post("/v1/tasks/compute_index", json={"start": "2024-01-01"})
        bad_date = client.post("/v1/tasks/compute_index", json={"start": "yesterday"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["field"] == "days_to_keep"
    assert good.status_code == 202
    assert bad_date.status_code == 422 and bad_date.json()["detail"][0]["field"] == "start"


def test_malformed_and_oversized_bodies(stack: Stack) -> None:
    headers = {"Content-Type": "application/json"}
    with stack.client() as client:
        malformed = client.post("/v1/tasks/ping", content=b"{not json", headers=headers)
        assert malformed.status_code == 422
        assert malformed.json()["detail"][0]["field"] == "body"
        limit = Settings().api_max_body_bytes
        big = json.dumps({"symbols": ["X" * 10] * (limit // 10)}).encode()
        assert len(big) > limit
        assert client.post("/v1/tasks/refresh_market_data", content=big).status_code == 413
        unknown = client.post("/v1/tasks/no_such_task")
        assert unknown.status_code == 404 and "ping" in unknown.json()["detail"]


# --- idempotency ----------------------------------------------------------------------------


def admin_cleanup_runs() -> int:
    with get_engine().connect() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT count(*) FROM task_runs"
                    " WHERE name = 'cleanup_old_data' AND requested_by = 'api:admin'"
                )
            ).scalar_one()
        )


def test_idempotency_key_under_concurrent_identical_requests(stack: Stack) -> None:
    runs_before = admin_cleanup_runs()
    first_ids = []
    for _ in range(5):
        key = str(uuid.uuid4())
        barrier = threading.Barrier(2)
        responses: list[httpx.Response] = []

        def post(
            key: str = key,
            barrier: threading.Barrier = barrier,
            responses: list[httpx.Response] = responses,
        ) -> None:
            with stack.client() as client:
                barrier.wait()
                responses.append(
                    client.post(
                        "/v1/tasks/cleanup_old_data",
                        json={"days_to_keep": 3650},
                        headers={"Idempotency-Key": key},
                    )
                )

        threads = [threading.Thread(target=post) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(r.status_code for r in responses) == [200, 202]
        ids = {r.json()["id"] for r in responses}
        assert len(ids) == 1  # one task: the API sends only under the id it stored first
        first_ids.extend(ids)
        with stack.client() as client:
            again = client.post(
                "/v1/tasks/cleanup_old_data",
                json={"days_to_keep": 3650},
                headers={"Idempotency-Key": key},
            )
            other = client.post(
                "/v1/tasks/cleanup_old_data",
                json={"days_to_keep": 10},
                headers={"Idempotency-Key": key},
            )
        assert again.status_code == 200 and again.json()["id"] in ids
        assert other.status_code == 409
    for task_id in first_ids:
        wait_state(stack, task_id, {"SUCCESS"})
    time.sleep(1)  # a second message, if one had been sent, would have run by now
    assert admin_cleanup_runs() - runs_before == 5


# --- following and revoking -----------------------------------------------------------------


def read_events(stack: Stack, task_id: str, timeout: float = 120) -> list[dict[str, Any]]:
    events = []
    with (
        stack.client(timeout=timeout) as client,
        client.stream("GET", f"/v1/tasks/{task_id}/events") as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: ") :]))
    return events


def test_the_event_stream_follows_a_refresh_to_success(stack: Stack) -> None:
    task_id = submitted(stack, "refresh_market_data", {"mode": "full"})
    events = read_events(stack, task_id)
    states = [e["state"] for e in events]
    assert states[-1] == "SUCCESS", states
    progress = [e["progress"] for e in events if e["state"] == "PROGRESS"]
    assert progress, states
    assert all(p["total"] == 14 and 0 <= p["current"] <= 14 for p in progress)
    assert events[-1]["result"]["assets_refreshed"] == 14
    assert events[-1]["requested_by"] == "api:admin"
    # A finished task: its final state, and the stream ends.
    assert [e["state"] for e in read_events(stack, task_id)] == ["SUCCESS"]
    with stack.client() as client:
        view = client.get(f"/v1/tasks/{task_id}").json()
    assert view["state"] == "SUCCESS" and view["task"] == "refresh_market_data"


def test_revoke_a_waiting_task_and_terminate_a_running_one(stack: Stack) -> None:
    # The worker runs one task at a time: a long one keeps the next waiting.
    running = stack.cli("submit", "test.sleep", "--arg", "seconds=30").stdout.strip()
    wait_state(stack, running, {"STARTED"})
    waiting = submitted(stack)
    with stack.client("pinger") as client:
        response = client.delete(f"/v1/tasks/{waiting}")
    assert response.status_code == 202 and response.json()["terminate"] is False
    started = time.monotonic()
    with stack.client() as client:
        assert client.delete(f"/v1/tasks/{running}", params={"terminate": "true"}).status_code == (
            202
        )
    assert wait_state(stack, running, {"REVOKED", "SUCCESS", "FAILURE"})["status"] == "REVOKED"
    assert time.monotonic() - started < 20  # stopped, not run to its end
    assert wait_state(stack, waiting, {"REVOKED", "SUCCESS"})["status"] == "REVOKED"
    with stack.client() as client:
        assert client.get(f"/v1/tasks/{waiting}").json()["state"] == "REVOKED"
    submitted(stack)  # the worker goes on


def test_queues_health_metrics_and_docs(stack: Stack) -> None:
    submitted(stack)  # one ping by the admin token, counted in /metrics
    with stack.client("reporting") as client:
        body = client.get("/v1/queues").json()
    assert set(body["queues"]) == {"high_priority", "low_priority", "default"}
    assert any(name.startswith("high@") for name in body["workers"])
    with httpx.Client(base_url=stack.url) as client:
        assert client.get("/healthz").json() == {"status": "ok", "tokens": len(TOKENS)}
        metrics = client.get("/metrics").text
        assert 'waardhaven_api_tasks_submitted_total{task="ping",token="admin"}' in metrics
        assert client.get("/docs").status_code == 200
        paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/tasks/{name}", "/v1/tasks/{task_id}", "/v1/queues"} <= set(paths)


def test_tokens_are_rotated_without_a_restart(stack: Stack, tmp_path: Any) -> None:
    from tasks.api.tokens import entry_for, new_token

    path = stack.api.env["API_TOKENS_FILE"]
    with open(path) as f:
        original = f.read()
    fresh = new_token()
    entries = json.loads(original)["tokens"]
    entries = [e for e in entries if e["name"] != "indexer"]
    entries.append(entry_for("indexer", fresh, {"*": ["read"]}))
    try:
        with open(path + ".new", "w") as f:
            json.dump({"tokens": entries}, f)
        os.replace(path + ".new", path)  # what the kubelet's symlink swap amounts to
        time.sleep(1.5)
        with httpx.Client(base_url=stack.url) as client:
            old = client.get(
                "/v1/queues", headers={"Authorization": f"Bearer {stack.tokens['indexer']}"}
            )
            new = client.get(
                "/v1/queues",
                params={"timeout": 0.5},
                headers={"Authorization": f"Bearer {fresh}"},
            )
        assert old.status_code == 401
        assert new.status_code == 200
        # A broken file does not lock everyone out: the tokens in force stay.
        with open(path + ".new", "w") as f:
            f.write("{broken")
        os.replace(path + ".new", path)
        time.sleep(1.5)
        with httpx.Client(base_url=stack.url) as client:
            still = client.get(
                "/v1/queues", params={"timeout": 0.5}, headers={"Authorization": f"Bearer {fresh}"}
            )
        assert still.status_code == 200
        assert "tokens file not re-read" in stack.api.output
    finally:
        with open(path + ".new", "w") as f:
            f.write(original)
        os.replace(path + ".new", path)
        time.sleep(1.5)
