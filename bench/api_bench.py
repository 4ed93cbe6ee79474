"""The HTTP API and signed messages: what a client sees, and what signing costs (issue 11).

- Sign and verify one task message with Celery's `auth` serializer (RSA-3072 PSS, SHA-256)
  against the plain JSON serializer, in this process: the cost per message at the sender and
  at the worker (which decodes it twice: the guard in the main process, then the pool child).
- The same stack twice in one run, unsigned then signed: services/api/run on loopback and a
  worker-high process (production settings, WORKER_CONCURRENCY=2, queue `default`). For each:
  submit-to-result latency of `ping` as a client sees it (POST, then the event stream until
  SUCCESS; one at a time), and throughput (8 client threads POSTing, until the last SUCCESS).
  The rate limit is raised for the run: it is a quota, not what is measured.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import REPO, VENV_BIN, Worker, free_port, log, median, percentile

Row = tuple[str, str, str, str, str, str]
CLIENT_THREADS = 8


def sign_cost(keys: Path, repeat: int) -> dict[str, Any]:
    from celery.security.certificate import Certificate, FSCertStore
    from celery.security.key import PrivateKey
    from celery.security.serialization import SecureSerializer
    from kombu.serialization import dumps, loads

    signer = SecureSerializer(
        PrivateKey((keys / "signing.key").read_text()),
        Certificate((keys / "signing.crt").read_text()),
        FSCertStore(str(keys / "certs")),
        "sha256",
        "json",
    )
    bodies = {
        "ping": [[], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}],
        "refresh_5000": [[], {"symbols": [f"S{i:05d}" for i in range(5000)]}, {}],
    }
    out: dict[str, Any] = {}
    for name, body in bodies.items():

        def each(fn: Any) -> float:
            times = []
            for _ in range(repeat):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            return median(times) * 1e6  # microseconds

        signed = signer.serialize(body)
        plain = dumps(body, serializer="json")[2]
        out[name] = {
            "bytes_json": len(plain),
            "bytes_signed": len(signed),
            "json_dumps_us": each(lambda body=body: dumps(body, serializer="json")),
            "json_loads_us": each(
                lambda plain=plain: loads(plain, "application/json", "utf-8", accept=None)
            ),
            "sign_us": each(lambda body=body: signer.serialize(body)),
            "verify_us": each(lambda signed=signed: signer.deserialize(signed)),
        }
    return out


class Api:
    def __init__(self, workdir: Path, label: str, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = (workdir / f"api-{label}.log").open("wb")
        self.proc = subprocess.Popen(
            [str(REPO / "services" / "api" / "run")],
            cwd=REPO,
            env={
                **os.environ,
                "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                "API_PORT": str(self.port),
                "API_ADDRESS": "127.0.0.1",
                "LOG_LEVEL": "WARNING",  # no access log line per request
                **env,
            },
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"api {label} did not start")
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


def latency(url: str, token: str, n: int) -> dict[str, Any]:
    samples = []
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
        for _ in range(n):
            start = time.perf_counter()
            task_id = client.post("/v1/tasks/ping").json()["id"]
            with client.stream("GET", f"/v1/tasks/{task_id}/events") as stream:
                last = None
                for line in stream.iter_lines():
                    if line.startswith("data: "):
                        last = json.loads(line[6:])["state"]
            assert last == "SUCCESS", last
            samples.append((time.perf_counter() - start) * 1000)
    return {
        "n": n,
        "p50_ms": percentile(samples, 50),
        "p90_ms": percentile(samples, 90),
        "p99_ms": percentile(samples, 99),
    }


def throughput(app: Any, url: str, token: str, n: int) -> dict[str, Any]:
    ids: list[str] = []
    lock = threading.Lock()
    per_thread = n // CLIENT_THREADS

    def client_thread() -> None:
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
            for _ in range(per_thread):
                task_id = client.post("/v1/tasks/ping").json()["id"]
                with lock:
                    ids.append(task_id)

    start = time.perf_counter()
    threads = [threading.Thread(target=client_thread) for _ in range(CLIENT_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    submitted = time.perf_counter() - start
    pending = set(ids)
    while pending:  # the last SUCCESS
        pending = {i for i in pending if app.backend.get_task_meta(i)["status"] != "SUCCESS"}
        if pending:
            time.sleep(0.05)
    done = time.perf_counter() - start
    return {
        "n": len(ids),
        "submit_per_second": len(ids) / submitted,
        "per_second": len(ids) / done,
    }


def run(app: Any, workdir: Path, scale: float) -> dict[str, Any]:
    from tasks.api.tokens import dumps_file, entry_for, new_token
    from tasks.signing import env_for, generate_keys

    keys = generate_keys(workdir / "signing-keys")
    token = new_token()
    tokens_file = workdir / "api-tokens.json"
    tokens_file.write_text(dumps_file([entry_for("bench", token, {"*": ["*"]})]))
    results: dict[str, Any] = {"sign": sign_cost(keys, repeat=max(50, int(300 * scale)))}
    n_latency = max(30, int(200 * scale))
    n_throughput = max(80, int(800 * scale))
    for label, extra in (("unsigned", {"TASK_SIGNING": "false"}), ("signed", env_for(keys))):
        env = {
            "API_TOKENS_FILE": str(tokens_file),
            "API_RATE_LIMIT": "1000000",
            **extra,
        }
        worker = Worker(
            "worker-high",
            workdir,
            f"api-{label}",
            WORKER_QUEUES="default",
            WORKER_CONCURRENCY="2",
            **env,
        ).wait_ready()
        api = Api(workdir, label, env)
        try:
            log(f"api ({label}): latency x{n_latency}, throughput x{n_throughput}")
            latency(api.url, token, 10)  # warm up: imports, connections, pool children
            results[label] = {
                "latency": latency(api.url, token, n_latency),
                "throughput": throughput(app, api.url, token, n_throughput),
            }
            if label == "signed":
                output = worker.output()
                assert "Refused task message" not in output, "signed messages refused"
        finally:
            api.stop()
            worker.stop()
    results["rows"] = rows(results)
    return results


def rows(r: dict[str, Any]) -> list[Row]:
    out: list[Row] = []
    for label in ("unsigned", "signed"):
        lat, thr = r[label]["latency"], r[label]["throughput"]
        base = r["unsigned"]
        out.append(
            (
                "A1" if label == "unsigned" else "A2",
                f"API ping submit-to-result ({label}), one client, POST + event stream",
                f"p50 {lat['p50_ms']:.1f} ms, p90 {lat['p90_ms']:.1f} ms, "
                f"p99 {lat['p99_ms']:.1f} ms",
                "" if label == "unsigned" else f"unsigned p50 {base['latency']['p50_ms']:.1f} ms",
                "" if label == "unsigned" else f"{lat['p50_ms'] / base['latency']['p50_ms']:.2f}x",
                "",
            )
        )
        out.append(
            (
                "A3" if label == "unsigned" else "A4",
                f"API ping throughput ({label}), {CLIENT_THREADS} clients, 1 worker x2",
                f"{thr['per_second']:.0f}/s to SUCCESS (POSTs {thr['submit_per_second']:.0f}/s)",
                "" if label == "unsigned" else f"unsigned {base['throughput']['per_second']:.0f}/s",
                ""
                if label == "unsigned"
                else f"{thr['per_second'] / base['throughput']['per_second']:.2f}x",
                "",
            )
        )
    for name, s in r["sign"].items():
        plain = s["json_dumps_us"] + s["json_loads_us"]
        out.append(
            (
                "A5",
                f"sign + verify one {name} message ({s['bytes_json']:,} B JSON, "
                f"{s['bytes_signed']:,} B signed)",
                f"sign {s['sign_us']:.0f} us, verify {s['verify_us']:.0f} us",
                f"JSON dumps {s['json_dumps_us']:.0f} us + loads {s['json_loads_us']:.0f} us",
                f"{(s['sign_us'] + s['verify_us']) / plain:.0f}x",
                "",
            )
        )
    return out
