"""`waardhaven-tasks`: operate the task system from a shell.

waardhaven-tasks migrate | seed
waardhaven-tasks submit refresh_market_data --arg mode=full --wait
waardhaven-tasks status ID | inspect | revoke ID [--terminate]
waardhaven-tasks dev          (the local stack; what `make run` starts)
"""

from __future__ import annotations

import getpass
import json
import os
import sys
import time
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console(stderr=True)
TERMINAL_STATES = {"SUCCESS", "FAILURE", "REVOKED", "REJECTED"}


def _app() -> Any:
    from tasks.celery_app import app

    app.loader.import_default_modules()
    return app


def _parse_arg(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise click.BadParameter(f"expected key=value, got {item!r}", param_hint="--arg")
    try:
        return key, json.loads(raw)  # numbers, lists, null
    except json.JSONDecodeError:
        return key, raw  # plain strings need no quotes


def _load_dev_env() -> None:
    """Outside a pod, find the stack `make run` started (var/dev.env); the environment wins."""
    from tasks.devstack import DEV_ENV

    if DEV_ENV.exists():
        for line in DEV_ENV.read_text().splitlines():
            key, _, value = line.partition("=")
            os.environ.setdefault(key, value)


@click.group(help=__doc__)
@click.pass_context
def main(ctx: click.Context) -> None:
    if ctx.invoked_subcommand != "dev":  # `dev` starts a new stack: a stale file must not win
        _load_dev_env()


@main.command()
def migrate() -> None:
    """Create or upgrade the database schema (Alembic)."""
    from tasks.migrate import upgrade

    upgrade()
    console.print("[green]schema up to date[/]")


@main.command("wait-for-migrations")
@click.option("--timeout", default=600.0, show_default=True, help="Seconds to wait.")
def wait_for_migrations(timeout: float) -> None:
    """Wait until the schema is at the newest revision (exit 1 after --timeout)."""
    from tasks.migrate import wait_for_head

    try:
        head = wait_for_head(timeout)
    except TimeoutError as exc:
        raise click.ClickException(str(exc)) from None
    console.print(f"[green]schema at {head}[/]")


@main.command()
def seed() -> None:
    """Insert the 14 seed assets and the default strategy (idempotent)."""
    from tasks import store
    from tasks.db import session_scope

    with session_scope() as session:
        n = store.seed_assets(session)
    console.print(f"[green]{n} assets seeded[/]")


@main.command()
@click.argument("task")
@click.option("--arg", "args", multiple=True, metavar="KEY=VALUE", help="Task keyword argument.")
@click.option("--queue", default=None, help="Override the routed queue.")
@click.option("--wait/--no-wait", default=False, help="Follow progress until the task ends.")
@click.option("--timeout", default=3600.0, show_default=True, help="Seconds to wait.")
def submit(task: str, args: tuple[str, ...], queue: str | None, wait: bool, timeout: float) -> None:
    """Send TASK (by its short name) with --arg key=value keyword arguments."""
    app = _app()
    public = sorted(n for n in app.tasks if not n.startswith("celery."))
    if task not in app.tasks:
        raise click.BadParameter(f"unknown task {task!r}; known: {', '.join(public)}")
    kwargs = dict(_parse_arg(a) for a in args)
    options = {"queue": queue} if queue else {}
    # task_runs.requested_by: who sent it from a shell
    headers = {"requested_by": f"cli:{getpass.getuser()}"}
    result = app.tasks[task].apply_async(kwargs=kwargs, headers=headers, **options)
    click.echo(result.id)
    if wait or app.conf.task_always_eager:  # eager (debugging): it already ran, right here
        sys.exit(_follow(result, timeout))


def _follow(result: Any, timeout: float) -> int:
    """A live progress bar fed by the PROGRESS state; exit status 0 only on SUCCESS."""
    deadline = time.monotonic() + timeout
    with Progress(
        TextColumn("[bold]{task.fields[state]:<8}"),
        BarColumn(),
        TextColumn("{task.fields[counts]}"),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as bar:
        row = bar.add_task("waiting for a worker", total=None, state="PENDING", counts="")
        while True:
            state, info = result.state, result.info
            if state == "PROGRESS" and isinstance(info, dict):
                current, total = info.get("current", 0), info.get("total") or None
                status = str(info.get("status", ""))
                counts = f"{current}/{total}" if total else ""
                bar.update(
                    row,
                    total=total,
                    completed=current,
                    description=status,
                    state=state,
                    # "2/7 chunks done" says it already: the counts once, not twice
                    counts="" if status.startswith(counts) else counts,
                )
            else:
                bar.update(row, state=state)
            if state in TERMINAL_STATES:
                if state == "SUCCESS":
                    bar.update(row, total=1, completed=1, description="done", counts="")
                break
            if time.monotonic() > deadline:
                console.print(f"[yellow]still {state} after {timeout:.0f}s[/]")
                return 2
            time.sleep(0.2)
    if result.state == "SUCCESS":
        click.echo(json.dumps(result.result, indent=2, default=str))
        return 0
    console.print(f"[red]{result.state}[/]: {result.info!r}")
    return 1


@main.command()
@click.argument("task_id")
def status(task_id: str) -> None:
    """State, progress and result of a task."""
    result = _app().AsyncResult(task_id)
    info = result.info
    if isinstance(info, BaseException):
        info = f"{type(info).__name__}: {info}"
    click.echo(json.dumps({"id": task_id, "state": result.state, "info": info}, default=str))


@main.command()
@click.option("--timeout", default=2.0, show_default=True, help="Seconds to wait for replies.")
def inspect(timeout: float) -> None:
    """Active, reserved and scheduled tasks per worker, and queue lengths."""
    from tasks.celery_app import QUEUES

    app = _app()
    inspector = app.control.inspect(timeout=timeout)
    replies = {
        "active": inspector.active() or {},
        "reserved": inspector.reserved() or {},
        "scheduled": inspector.scheduled() or {},
    }
    workers = sorted(set().union(*replies.values()))
    table = Table(title="workers")
    for column in ("worker", "active", "reserved", "scheduled", "tasks running"):
        table.add_column(column)
    for worker in workers:
        active = replies["active"].get(worker, [])
        table.add_row(
            worker,
            str(len(active)),
            str(len(replies["reserved"].get(worker, []))),
            str(len(replies["scheduled"].get(worker, []))),
            ", ".join(f"{t['name']}[{t['id'][:8]}]" for t in active) or "-",
        )
    if not workers:
        console.print("[yellow]no worker replied[/]")
    Console().print(table)
    queues = Table(title="queues")
    queues.add_column("queue")
    queues.add_column("messages waiting")
    with app.connection_for_write() as conn:
        client = conn.default_channel.client
        for q in QUEUES:
            queues.add_row(q, str(client.llen(q)))
    Console().print(queues)


@main.command()
@click.argument("task_id")
@click.option("--terminate", is_flag=True, help="Also kill it if it is already running.")
def revoke(task_id: str, terminate: bool) -> None:
    """Revoke a task: it will not start; with --terminate a running one is killed."""
    from tasks.revokes import revoke as revoke_for_all

    # Recorded in Redis for the workers that start later, then broadcast; stopping a running
    # task uses SIGQUIT (the workers' soft shutdown makes their children ignore SIGTERM).
    revoke_for_all(_app(), task_id, terminate=terminate)
    console.print(f"revoked {task_id}" + (" (terminating)" if terminate else ""))


@main.command("api-token")
@click.argument("name")
@click.option(
    "--allow",
    multiple=True,
    required=True,
    metavar="PATTERN=ACTIONS",
    help="Task pattern and actions, e.g. generate_report=submit, '*=read', '*=*'.",
)
def api_token(name: str, allow: tuple[str, ...]) -> None:
    """Create an API token: prints the token (once: only its hash is kept) and its entry for
    the tokens file (API_TOKENS_FILE, the Secret)."""
    from tasks.api.tokens import actions_from_args, entry_for, new_token

    try:
        entry = entry_for(name, token := new_token(), actions_from_args(allow))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="NAME/--allow") from None
    console.print("token (shown once; give it to the client):")
    click.echo(token)
    console.print('entry for the "tokens" list of the tokens file:')
    click.echo(json.dumps(entry))


@main.command("signing-keys")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--days", default=730, show_default=True, help="Validity of the certificate.")
@click.option("--name", default="waardhaven-tasks", show_default=True, help="Certificate CN.")
def signing_keys(directory: str, days: int, name: str) -> None:
    """Write a new signing key and certificate (TASK_SIGNING_KEY/CERT, certs/ for the store)."""
    from pathlib import Path

    from tasks.signing import env_for, generate_keys

    out = generate_keys(Path(directory), name=name, days=days)
    for key, value in env_for(out.resolve()).items():
        click.echo(f"{key}={value}")


@main.command()
def dev() -> None:
    """Start the whole stack locally (what `make run` does); Ctrl-C stops it."""
    from tasks.devstack import run

    sys.exit(run())


if __name__ == "__main__":
    main()
