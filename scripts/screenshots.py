#!/usr/bin/env python3
"""Retake the screenshots in docs/images/ from a running `make run` stack.

    .venv/bin/python scripts/screenshots.py [--out docs/images]

Starts `.venv/bin/waardhaven-tasks dev` (its state in a temporary directory, so a stack you run
yourself is not touched), sends a few tasks, then takes:

- flower-tasks.png, flower-workers.png: Flower's tasks and workers pages, logged in with the
  stack's basic-auth credentials, by headless Chromium;
- submit-progress.png: `waardhaven-tasks submit refresh_market_data --wait` in a tmux pane,
  captured with its colours while the bar moves (the refresh in chunks of 2 assets), rendered
  to HTML by rich and to PNG by Chromium.

Chromium and tmux come from Debian (`apt-get install chromium tmux`); the script installs them
when they are missing (as root, or with passwordless sudo).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from base64 import b64encode
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = REPO / ".venv" / "bin"
CLI = str(BIN / "waardhaven-tasks")
PANE = (118, 12)  # columns, rows of the tmux pane the progress bar is drawn in


def ensure_debian(binary: str, package: str) -> str:
    found = shutil.which(binary)
    if found:
        return found
    apt = ["apt-get"] if os.geteuid() == 0 else ["sudo", "-n", "apt-get"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    print(f"installing {package} (Debian)", flush=True)
    subprocess.run([*apt, "update", "-qq"], env=env, check=True)
    subprocess.run(
        [*apt, "install", "-y", "-qq", "--no-install-recommends", package], env=env, check=True
    )
    found = shutil.which(binary)
    if not found:
        raise SystemExit(f"{package} installed no {binary}")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, check: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.3)
    raise SystemExit(f"timed out waiting for {what}")


def chromium_png(chromium: str, url: str, out: Path, size: tuple[int, int], wait_ms: int) -> None:
    with tempfile.TemporaryDirectory(prefix="wh-chromium-") as profile:
        subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",  # root in a container has no user namespace for the sandbox
                "--disable-gpu",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                f"--window-size={size[0]},{size[1]}",
                f"--virtual-time-budget={wait_ms}",
                f"--screenshot={out}",
                url,
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
    if not out.exists() or out.stat().st_size < 1000:
        raise SystemExit(f"chromium wrote no screenshot of {url}")
    print(f"wrote {out.relative_to(REPO) if out.is_relative_to(REPO) else out}", flush=True)


def flower_ok(port: int, auth: str) -> bool:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/workers",
        headers={"Authorization": "Basic " + b64encode(auth.encode()).decode()},
    )
    try:
        with urllib.request.urlopen(request, timeout=3) as response:
            return bool(response.status == 200 and b"@" in response.read())  # a worker listed
    except OSError:
        return False


def progress_capture(env: dict[str, str], tmux: str) -> str:
    """The pane's text with its colours, taken while the bar is part-way (else at the end)."""
    session = f"wh-shot-{os.getpid()}"
    command = f"{CLI} submit refresh_market_data --arg mode=full --wait; sleep 60"
    subprocess.run(
        [tmux, "new-session", "-d", "-s", session, "-x", str(PANE[0]), "-y", str(PANE[1]),
         command],
        env=env,
        check=True,
    )  # fmt: skip
    frames: list[str] = []  # part-way pictures, one per change
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            text = subprocess.run(
                [tmux, "capture-pane", "-p", "-e", "-t", session],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            if "PROGRESS" in text and "chunks done" in text and "0/" not in text:
                frames.append(text)
            if "SUCCESS" in text or "FAILURE" in text:
                return frames[len(frames) // 2] if frames else text
            time.sleep(0.1)
        raise SystemExit("submit --wait did not finish in 300 s")
    finally:
        subprocess.run([tmux, "kill-session", "-t", session], check=False)


def terminal_html(ansi: str, title: str) -> str:
    from rich.console import Console
    from rich.terminal_theme import MONOKAI
    from rich.text import Text

    console = Console(record=True, width=PANE[0], file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(Text.from_ansi(ansi.rstrip("\n")))
    body = console.export_html(theme=MONOKAI, inline_styles=True)
    style = (
        "<style>body{margin:0;background:#272822}pre{margin:0;padding:14px 18px;"
        "font:15px/1.35 'DejaVu Sans Mono',monospace}</style>"
    )
    return body.replace("<head>", f"<head><title>{title}</title>{style}", 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images")
    args = parser.parse_args()
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    chromium = ensure_debian("chromium", "chromium")
    tmux = ensure_debian("tmux", "tmux")
    if not Path(CLI).exists():
        raise SystemExit("no .venv: run `make venv` first")

    state = Path(tempfile.mkdtemp(prefix="wh-screenshots-"))
    user, password = "admin", b64encode(os.urandom(12)).decode().rstrip("=").replace("/", "x")
    port = free_port()
    env = {
        **os.environ,
        "WAARDHAVEN_STATE_DIR": str(state),
        "FLOWER_BASIC_AUTH": f"{user}:{password}",
        "FLOWER_PORT": str(port),
        "TERM": "xterm-256color",
        "COLORTERM": "truecolor",
        "REFRESH_CHUNK_SIZE": "2",  # the 14 seed assets in 7 chunks: a bar that moves
    }
    for key in ("REDIS_URL", "DATABASE_URL"):  # a stack of its own, always
        env.pop(key, None)
    log = (state / "dev.log").open("wb")
    stack = subprocess.Popen(
        [CLI, "dev"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        auth = env["FLOWER_BASIC_AUTH"]
        wait_for("the stack (Flower and a worker)", lambda: flower_ok(port, auth), 180)
        ansi = progress_capture(env, tmux)
        for task in ("compute_index", "generate_report", "ping"):  # some history for Flower
            submit = [CLI, "submit", task, "--wait"]
            subprocess.run(submit, env=env, check=True, capture_output=True)
        page = state / "progress.html"
        page.write_text(terminal_html(ansi, "waardhaven-tasks submit --wait"))
        height = 32 + 21 * len(ansi.rstrip("\n").splitlines())  # the pane's lines, no more
        chromium_png(chromium, page.as_uri(), out / "submit-progress.png", (1100, height), 500)
        time.sleep(2)  # Flower has the last events
        base = f"http://{user}:{password}@127.0.0.1:{port}"
        chromium_png(chromium, f"{base}/tasks", out / "flower-tasks.png", (1280, 720), 6000)
        chromium_png(chromium, f"{base}/workers", out / "flower-workers.png", (1280, 520), 6000)
    finally:
        os.killpg(stack.pid, signal.SIGTERM)
        try:
            stack.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(stack.pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(state, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
