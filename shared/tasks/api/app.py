"""The HTTP API: trigger, follow and revoke tasks with per-task permissions (docs/api.md).

`uvicorn --factory tasks.api.app:create_api` (services/api/run). Sync endpoints (FastAPI runs
them in its thread pool) use the same Celery app, Redis client and argument models as the CLI
and the workers; the event stream is async and follows the result backend's own pub/sub channel
of the task, so it sees every state the worker stores, in order.
"""

import hashlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

import redis
from celery._state import _set_task_join_will_block
from fastapi import Depends, FastAPI, Header, HTTPException, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.sse import EventSourceResponse, ServerSentEvent
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, ValidationError

from tasks import redis_conn, revokes
from tasks.api.tokens import Action, TokenEntry, TokenStore
from tasks.market_data.ratelimit import RedisRateLimiter
from tasks.settings import Settings, get_settings

logger = logging.getLogger("tasks.api")

TERMINAL = frozenset({"SUCCESS", "FAILURE", "REVOKED", "REJECTED"})
IDEMPOTENCY_TTL = 24 * 3600  # a client retrying within a day gets its first task back
TASK_KEY = "waardhaven:api:task:{id}"  # name and requester of a task sent through the API
IDEMPOTENCY_KEY = "waardhaven:api:idempotency:{token}:{key}"
RATE_KEY = "waardhaven:api:rate:{token}"


class NoArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def argument_models() -> dict[str, type[BaseModel]]:
    """The tasks a client may submit, each with the model its task validates with."""
    from tasks.background_tasks import CleanupArgs, IndexArgs, RefreshArgs, ReportArgs

    return {
        "refresh_market_data": RefreshArgs,
        "compute_index": IndexArgs,
        "generate_report": ReportArgs,
        "cleanup_old_data": CleanupArgs,
        "ping": NoArgs,
    }


class TaskAccepted(BaseModel):
    id: str
    task: str
    state: str
    url: str
    events: str


class Progress(BaseModel):
    current: int | None = None
    total: int | None = None
    status: str | None = None


class TaskView(BaseModel):
    id: str
    task: str | None
    state: str
    progress: Progress | None = None
    result: Any = None
    error: dict[str, str] | None = None
    requested_by: str | None = None


def task_view(task_id: str, meta: dict[str, Any], known: dict[str, Any] | None) -> TaskView:
    """A backend meta dict ({status, result, ...}) as the API shows it."""
    state = str(meta.get("status") or "PENDING")
    result = meta.get("result")
    view = TaskView(
        id=task_id,
        task=(known or {}).get("task") or meta.get("name"),
        state=state,
        requested_by=(known or {}).get("requested_by"),
    )
    if state == "PROGRESS" and isinstance(result, dict):
        view.progress = Progress(**{k: result.get(k) for k in ("current", "total", "status")})
    elif state == "SUCCESS":
        view.result = result
    elif isinstance(result, BaseException):
        view.error = {"type": type(result).__name__, "message": str(result)}
    elif state in TERMINAL and result is not None:
        view.error = {"type": state, "message": str(result)}
    return view


def create_api(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    if not logging.getLogger().handlers:  # uvicorn configures only its own loggers
        logging.basicConfig(level=settings.log_level, format="%(levelname)s %(name)s: %(message)s")
    if not settings.api_tokens_file:
        raise SystemExit("api: API_TOKENS_FILE must name the tokens file (see docs/api.md)")
    tokens = TokenStore(settings.api_tokens_file)  # a bad file stops the API here
    from tasks.celery_app import Queue
    from tasks.celery_app import app as celery

    # Celery's send_task subscribes the sender to each task's result channel, for a later
    # .get(); the API never blocks on a result, and in a long-lived process the subscriptions
    # would pile up. The flag a worker sets for itself turns that off (and makes .get() raise).
    _set_task_join_will_block(True)
    models = argument_models()
    broker = redis_conn.client(settings)
    backend = celery.backend
    limiters: dict[str, RedisRateLimiter] = {}

    registry = CollectorRegistry()
    requests_total = Counter(
        "waardhaven_api_requests_total",
        "API requests by route, method and status.",
        ["route", "method", "status"],
        registry=registry,
    )
    request_seconds = Histogram(
        "waardhaven_api_request_seconds",
        "API request duration (the event stream: until it ends).",
        ["route", "method"],
        registry=registry,
    )
    submitted_total = Counter(
        "waardhaven_api_tasks_submitted_total",
        "Tasks sent through the API, by task and token name.",
        ["task", "token"],
        registry=registry,
    )

    api = FastAPI(
        title="waardhaven-tasks API",
        version="1",
        description="Trigger, follow and revoke background tasks. Bearer tokens: docs/api.md.",
        max_body_size=settings.api_max_body_bytes,
    )
    bearer = HTTPBearer(auto_error=False, description="An API token (docs/api.md)")

    @api.middleware("http")
    async def measure(request: Request, call_next: Callable[[Request], Any]) -> Any:
        started = time.perf_counter()
        response = await call_next(request)
        route = getattr(request.scope.get("route"), "path", "unmatched")
        requests_total.labels(route, request.method, str(response.status_code)).inc()
        request_seconds.labels(route, request.method).observe(time.perf_counter() - started)
        return response

    def authenticated(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> TokenEntry:
        token = tokens.authenticate(credentials.credentials) if credentials else None
        if token is None:
            logger.warning(
                "api: %s %s refused: %s bearer token",
                request.method,
                request.url.path,
                "invalid" if credentials else "no",
            )
            raise HTTPException(
                401, "a valid bearer token is required", {"WWW-Authenticate": "Bearer"}
            )
        limiter = limiters.get(token.name)
        if limiter is None:
            limiter = limiters[token.name] = RedisRateLimiter(
                broker,
                RATE_KEY.format(token=token.name),
                settings.api_rate_limit,
                settings.api_rate_period,
            )
        wait = limiter.acquire()
        if wait:
            raise HTTPException(
                429,
                f"rate limit of {settings.api_rate_limit} requests per "
                f"{settings.api_rate_period:g} s exceeded for token {token.name!r}",
                {"Retry-After": str(max(1, round(wait + 0.5)))},
            )
        return token

    Token = Annotated[TokenEntry, Depends(authenticated)]
    TaskId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]

    def require(token: TokenEntry, action: Action, task: str | None) -> None:
        if not token.may(action, task or ""):
            what = f"task {task!r}" if task else "tasks whose name the API does not know"
            raise HTTPException(403, f"token {token.name!r} may not {action} {what}")

    def known_task(task_id: str) -> dict[str, Any] | None:
        raw = broker.get(TASK_KEY.format(id=task_id))
        return json.loads(raw) if raw else None

    def lookup(token: TokenEntry, action: Action, task_id: str) -> tuple[dict[str, Any], Any]:
        """Permission check, then (what the API knows of the task, its backend meta)."""
        known = known_task(task_id)
        meta = backend.get_task_meta(task_id)
        require(token, action, (known or {}).get("task") or meta.get("name"))
        if known is None and meta.get("status") == "PENDING":
            raise HTTPException(404, f"no task {task_id} (unknown, or its result expired)")
        return known or {}, meta

    @api.post(
        "/v1/tasks/{name}",
        status_code=202,
        response_model=TaskAccepted,
        responses={200: {"description": "Repeated Idempotency-Key: the first task."}},
    )
    async def submit(
        name: Annotated[str, Path(max_length=64)],
        request: Request,
        response: Response,
        token: Token,
        idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
    ) -> TaskAccepted:
        """Send a task; the JSON body holds its keyword arguments (`{}` or empty: defaults)."""
        if name not in models:
            raise HTTPException(404, f"no task {name!r}; known: {', '.join(sorted(models))}")
        require(token, "submit", name)
        body = await request.body()
        try:
            # JSON mode of the task's own model: strict types, ISO dates as strings.
            models[name].model_validate_json(body or b"{}")
            kwargs = json.loads(body or b"{}")
        except ValidationError as exc:
            raise HTTPException(422, _errors(exc)) from None
        return await _run_sync(
            lambda: _enqueue(name, kwargs, token, idempotency_key, body, response)
        )

    def _enqueue(
        name: str,
        kwargs: dict[str, Any],
        token: TokenEntry,
        idempotency_key: str | None,
        body: bytes,
        response: Response,
    ) -> TaskAccepted:
        task_id = str(uuid.uuid4())
        if idempotency_key is not None:
            fingerprint = hashlib.sha256(name.encode() + b"\0" + body).hexdigest()
            key = IDEMPOTENCY_KEY.format(
                token=token.name, key=hashlib.sha256(idempotency_key.encode()).hexdigest()
            )
            mine = json.dumps({"id": task_id, "request": fingerprint})
            # SET NX: of two identical requests at the same time exactly one enqueues.
            if not broker.set(key, mine, nx=True, ex=IDEMPOTENCY_TTL):
                first = json.loads(broker.get(key) or mine)
                if first["request"] != fingerprint:
                    raise HTTPException(409, "Idempotency-Key already used for a different request")
                response.status_code = 200
                return _accepted(first["id"], name)
        requested_by = f"api:{token.name}"
        broker.set(
            TASK_KEY.format(id=task_id),
            json.dumps({"task": name, "requested_by": requested_by}),
            ex=max(settings.result_expires, IDEMPOTENCY_TTL),
        )
        try:
            celery.send_task(
                name, kwargs=kwargs, task_id=task_id, headers={"requested_by": requested_by}
            )
        except Exception:
            if idempotency_key is not None:
                broker.delete(key)  # not sent: a retry of the request must send it
            raise
        submitted_total.labels(name, token.name).inc()
        logger.info("api: token %s submitted %s[%s]", token.name, name, task_id)
        return _accepted(task_id, name)

    @api.get("/v1/tasks/{task_id}", response_model=TaskView)
    def get_task(task_id: TaskId, token: Token) -> TaskView:
        """State, progress (`current`, `total`, `status`), result or error."""
        known, meta = lookup(token, "read", task_id)
        return task_view(task_id, meta, known)

    def readable(task_id: TaskId, token: Token) -> dict[str, Any]:
        # A dependency: checked before the stream (and its 200) starts.
        return lookup(token, "read", task_id)[0]

    @api.get("/v1/tasks/{task_id}/events", response_class=EventSourceResponse)
    async def task_events(
        task_id: TaskId, known: Annotated[dict[str, Any], Depends(readable)]
    ) -> AsyncIterator[ServerSentEvent]:
        """Server-Sent Events: the task's state now, then each update until it ends."""
        key = backend.get_key_for_task(task_id)
        client = redis_conn.async_backend_client(settings)
        pubsub = client.pubsub()
        try:
            await pubsub.subscribe(key)  # first, so that no update falls between the two
            stored = await client.get(key)
            meta = backend.decode_result(stored) if stored else {"status": "PENDING"}
            n = 0
            while True:
                view = task_view(task_id, meta, known)
                n += 1
                yield ServerSentEvent(event="task", id=str(n), data=view.model_dump())
                if view.state in TERMINAL:
                    return
                message = None
                while message is None:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=30.0)
                meta = backend.decode_result(message["data"])
        finally:
            await pubsub.aclose()  # type: ignore[attr-defined]  # redis>=5, not in the stubs
            await client.aclose()  # type: ignore[attr-defined]  # redis>=5, not in the stubs

    @api.delete("/v1/tasks/{task_id}", status_code=202)
    def revoke_task(
        task_id: TaskId,
        token: Token,
        terminate: Annotated[bool, Query(description="Also stop it if it is running.")] = False,
    ) -> dict[str, Any]:
        """Revoke: a waiting task will not run; with terminate=true a running one is stopped."""
        lookup(token, "revoke", task_id)
        # Recorded for workers that start later, then broadcast; terminate sends SIGQUIT (workers
        # run with REMAP_SIGTERM=SIGQUIT: SIGQUIT is what stops a running task there).
        revokes.revoke(celery, task_id, terminate=terminate, client=broker)
        logger.info("api: token %s revoked %s (terminate=%s)", token.name, task_id, terminate)
        return {"id": task_id, "revoked": True, "terminate": terminate}

    @api.get("/v1/queues")
    def queues(
        token: Token,
        timeout: Annotated[float, Query(gt=0, le=10, description="Seconds for replies.")] = 1.0,
    ) -> dict[str, Any]:
        """Messages waiting per queue, and the workers that answered with their active tasks."""
        require(token, "read", None)
        lengths = {q.value: int(broker.llen(q.value)) for q in Queue}
        active = celery.control.inspect(timeout=timeout).active() or {}
        workers = {name: {"active": len(running)} for name, running in sorted(active.items())}
        return {"queues": lengths, "workers": workers}

    @api.get("/healthz", include_in_schema=False)
    def healthz() -> JSONResponse:
        try:
            broker.ping()
        except redis.RedisError as exc:
            return JSONResponse({"status": "redis unreachable", "error": str(exc)}, 503)
        return JSONResponse({"status": "ok", "tokens": len(tokens)})

    @api.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        # No token, like the workers' /metrics: the NetworkPolicy admits only Prometheus.
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    api.state.tokens = tokens
    return api


def _accepted(task_id: str, name: str) -> TaskAccepted:
    url = f"/v1/tasks/{task_id}"
    return TaskAccepted(id=task_id, task=name, state="PENDING", url=url, events=url + "/events")


def _errors(exc: ValidationError) -> list[dict[str, Any]]:
    """pydantic's errors, each naming its field (`loc`), without echoing the input back."""
    return [
        {"field": ".".join(str(p) for p in e["loc"]) or "body", "msg": e["msg"], "type": e["type"]}
        for e in exc.errors()
    ]


async def _run_sync(fn: Callable[[], Any]) -> Any:
    import anyio.to_thread

    return await anyio.to_thread.run_sync(fn)
