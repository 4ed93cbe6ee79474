"""Section 5: a model of the worker HPA, fed with the task runtimes measured in this run.

Each worker pool (worker-high, worker-low) is simulated in steps of STEP seconds: pods with
`concurrency` prefork slots take tasks from their queue (prefetch 1: a free slot takes the next
message), a task lasts its measured wall time stretched by CPU throttling when the pod's
children want more than the CPU limit, and the autoscaler decides every 15 s as
kube-controller-manager does (autoscaling/v2 algorithm: ratio to target, 10 % tolerance,
unready pods counted at 0 % CPU when scaling up, scale-down stabilisation window, rate
policies). The chart's settings (deploy/helm/waardhaven-tasks/values.yaml and the worker HPA /
ScaledObject templates) are copied below:

- CPU HPA (the fallback where KEDA is not installed): target 70 % of the 250m request;
  scale-up at most max(2 pods, 100 %) per 60 s; scale-down after 600 s of stabilisation, 1 pod
  per 120 s. The CPU it sees is a 30 s average 15 s old (metrics-server resolution and window).
- KEDA (the default where it is installed, keda.enabled: auto): Redis list length, 20 waiting
  messages per pod, polled every 15 s; scale-up with Kubernetes' default behaviour
  (max(4 pods, 100 %) per 15 s); the same scale-down.
  (KEDA counts the messages waiting in the list; the ones workers hold are in `unacked`.)

Assumptions (stated in docs/performance.md): PostgreSQL keeps up with 10 pods
(the runtimes were measured with PostgreSQL and the worker on the same 2 cores); a new pod is ready
POD_SCHEDULING_S after the HPA asks plus the worker start measured here; a pod removed by a
scale-down finishes its running tasks (each is far shorter than the 60 s soft shutdown).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

STEP = 0.25  # seconds
SYNC = 15.0  # HPA sync period and KEDA polling interval
POD_SCHEDULING_S = 20.0  # scheduling + container start with the image on the node (assumed)
HORIZON = 4 * 3600.0
REPORT_BACKLOGS = (20_000, 200_000)


@dataclass(frozen=True)
class Policy:
    key: str
    label: str
    kind: str  # "cpu", "queue" or "fixed"
    min_pods: int = 3
    max_pods: int = 10
    target: float = 0.70  # CPU utilisation of the request, or messages per pod
    up_policies: tuple[tuple[str, float, float], ...] = (("Pods", 2, 60), ("Percent", 100, 60))
    down_window: float = 600.0
    down_policy: tuple[float, float] = (1, 120)  # pods, period


CHART_CPU = Policy("cpu", "CPU HPA (chart fallback without KEDA: 70 % of 250m)", "cpu")
CHART_KEDA = Policy(
    "keda",
    "queue depth, KEDA (chart default with KEDA: 20 messages/pod)",
    "queue",
    target=20,
    up_policies=(("Pods", 4, 15), ("Percent", 100, 15)),
)


def fixed(n: int) -> Policy:
    return Policy(f"fixed{n}", f"fixed {n} pods", "fixed", min_pods=n, max_pods=n)


@dataclass
class TaskKind:
    name: str
    wall: float  # seconds, as measured in the worker child
    cpu_fraction: float  # CPU seconds / wall seconds in the child


@dataclass
class Pod:
    ready_at: float
    slots: list[tuple[TaskKind, float] | None]  # (kind, work left in seconds) per slot
    draining: bool = False
    cpu_history: deque[tuple[float, float]] = field(default_factory=deque)


@dataclass
class Outcome:
    drain_s: float
    peak_pods: int
    pod_seconds: float  # from t=0 until back to min pods (or the horizon)
    back_to_min_s: float
    timeline: list[tuple[float, int, int]]  # (t, pods, queued) every SYNC


def simulate(
    policy: Policy,
    burst: list[TaskKind],
    then: list[TaskKind],
    *,
    concurrency: int,
    start_delay: float,
    cpu_request: float = 0.25,
    cpu_limit: float = 1.0,
) -> Outcome:
    """`burst` is queued at t=0; `then` is queued when the burst has finished (compute_index
    after the refresh chunks)."""
    queue: deque[TaskKind] = deque(burst)
    follow = list(then)
    total = len(burst) + len(then)
    done = 0
    pods = [Pod(0.0, [None] * concurrency) for _ in range(policy.min_pods)]
    events: list[tuple[float, int]] = []  # (time, change of replicas)
    recommendations: list[tuple[float, int]] = []
    replicas = policy.min_pods
    t = 0.0
    drain = math.nan
    back = math.nan
    pod_seconds = 0.0
    peak = replicas
    timeline: list[tuple[float, int, int]] = []
    next_sync = SYNC
    while t < HORIZON:
        # Work.
        for pod in pods:
            if pod.ready_at > t:
                continue
            if not pod.draining:
                for i, slot in enumerate(pod.slots):
                    if slot is None and queue:
                        kind = queue.popleft()
                        pod.slots[i] = (kind, kind.wall)
            running = [s for s in pod.slots if s is not None]
            demand = sum(k.cpu_fraction for k, _ in running)
            over = max(1.0, demand / cpu_limit)
            pod.cpu_history.append((t, min(demand, cpu_limit)))
            while pod.cpu_history and pod.cpu_history[0][0] < t - 60:
                pod.cpu_history.popleft()
            for i, slot in enumerate(pod.slots):
                budget = STEP
                while slot is not None and budget > 0:
                    kind, left = slot
                    stretch = (1 - kind.cpu_fraction) + kind.cpu_fraction * over
                    need = left * stretch
                    if need > budget:
                        slot = (kind, left - budget / stretch)
                        budget = 0
                    else:
                        budget -= need
                        done += 1
                        slot = None
                        if not pod.draining and queue:
                            nxt = queue.popleft()
                            slot = (nxt, nxt.wall)
                pod.slots[i] = slot
        if follow and not queue and done == len(burst):
            queue.extend(follow)
            follow = []
        pods = [p for p in pods if not (p.draining and all(s is None for s in p.slots))]
        t += STEP
        pod_seconds += len(pods) * STEP
        if done == total and math.isnan(drain):
            drain = t
        if not math.isnan(drain) and replicas == policy.min_pods and len(pods) == replicas:
            back = t
            break
        if t + 1e-9 < next_sync:
            continue
        next_sync += SYNC
        timeline.append((t, len(pods), len(queue)))
        if policy.kind == "fixed":
            continue
        ready = [p for p in pods if p.ready_at <= t and not p.draining]
        if policy.kind == "cpu":
            # A 30 s average, 15 s old, per ready pod; unready pods count 0 when scaling up.
            usage = []
            for p in ready:
                window = [c for s, c in p.cpu_history if t - 45 <= s < t - 15]
                if window:
                    usage.append(sum(window) / len(window) / cpu_request)
            if not usage:
                continue
            ratio = sum(usage) / (policy.target * replicas)
            desired = math.ceil(sum(usage) / policy.target)
        else:
            waiting = len(queue)
            ratio = waiting / (policy.target * replicas)
            desired = math.ceil(waiting / policy.target)
        if abs(ratio - 1) <= 0.1:
            desired = replicas
        desired = max(policy.min_pods, min(policy.max_pods, desired))
        recommendations.append((t, desired))
        recommendations = [(s, d) for s, d in recommendations if s > t - policy.down_window]
        if desired < replicas:  # scale-down: the highest recommendation of the window
            desired = min(replicas, max(d for _, d in recommendations))
            value, period = policy.down_policy
            start = replicas - sum(c for s, c in events if s > t - period and c < 0)
            desired = max(desired, int(start - value))
        elif desired > replicas:
            limits: list[int] = []
            for kind_, value, period in policy.up_policies:
                start = replicas - sum(c for s, c in events if s > t - period and c > 0)
                limits.append(
                    int(start + value) if kind_ == "Pods" else math.ceil(start * (1 + value / 100))
                )
            desired = min(desired, max(limits))
        if desired > replicas:
            for _ in range(desired - replicas):
                pods.append(Pod(t + start_delay, [None] * concurrency))
        elif desired < replicas:
            active = [p for p in pods if not p.draining]
            for p in active[::-1][: replicas - desired]:  # the newest go first
                p.draining = True
        if desired != replicas:
            events.append((t, desired - replicas))
            replicas = desired
        peak = max(peak, replicas)
    return Outcome(drain, peak, pod_seconds, back, timeline)


def _kind(name: str, probe: dict[str, Any], fallback_wall: float) -> TaskKind:
    wall = probe.get("wall_s_median") or fallback_wall
    return TaskKind(name, float(wall), min(1.0, float(probe.get("cpu_fraction", 0.5))))


def run(results: dict[str, Any]) -> dict[str, Any]:
    refresh = results.get("refresh")
    index = results.get("index")
    reports = results.get("reports")
    if not (refresh and index and reports):
        return {"rows": [], "note": "needs the refresh, index and reports sections"}
    chunk = _kind("refresh_market_data_chunk", refresh["first_load"]["chunks"], 1.0)
    n_chunks = math.ceil(refresh["seed"]["assets"] / refresh["chunk_size"])
    compute = _kind("compute_index", index["task"]["probe"], index["task"]["seconds"])
    report = _kind("generate_report", reports["backlog"]["probe"], 0.1)
    start_delay = POD_SCHEDULING_S + max(refresh["worker_start_s"], reports["worker_start_s"])
    inputs = {
        "refresh_chunks": n_chunks,
        "chunk": vars(chunk),
        "compute_index": vars(compute),
        "report": vars(report),
        "report_backlogs": list(REPORT_BACKLOGS),
        "pod_start_s": start_delay,
        "concurrency": 2,
    }
    scenarios: dict[str, Any] = {}
    workloads = {
        "high": (
            f"worker-high: full refresh ({n_chunks} chunks of {refresh['chunk_size']} assets) "
            "+ compute_index",
            [chunk] * n_chunks,
            [compute],
        ),
    }
    for n in REPORT_BACKLOGS:
        workloads[f"low{n}"] = (f"worker-low: backlog of {n:,} reports", [report] * n, [])
    for key, (label, burst, then) in workloads.items():
        figures: dict[str, Any] = {"label": label}
        for policy in (fixed(3), CHART_CPU, CHART_KEDA, fixed(10)):
            out = simulate(policy, burst, then, concurrency=2, start_delay=start_delay)
            figures[policy.key] = {
                "label": policy.label,
                "drain_s": out.drain_s,
                "peak_pods": out.peak_pods,
                # pod-minutes above the minimum, from t=0 until the pool is back at it
                "extra_pod_minutes": (out.pod_seconds - policy.min_pods * out.back_to_min_s) / 60
                if not math.isnan(out.back_to_min_s)
                else math.nan,
                "back_to_min_s": out.back_to_min_s,
                "timeline": out.timeline[:40],
            }
        scenarios[key] = figures
    verdict = recommend(scenarios)
    return {
        "inputs": inputs,
        "scenarios": scenarios,
        "recommendation": verdict,
        "rows": rows(scenarios, inputs, verdict),
    }


def recommend(scenarios: dict[str, Any]) -> str:
    """Queue depth when it drains the backlogs at least as fast for fewer pod-minutes."""
    lows = [s for k, s in scenarios.items() if k.startswith("low")]
    faster = all(s["keda"]["drain_s"] <= s["cpu"]["drain_s"] * 1.05 for s in lows)
    cheaper = sum(s["keda"]["extra_pod_minutes"] for s in scenarios.values()) <= sum(
        s["cpu"]["extra_pod_minutes"] for s in scenarios.values()
    )
    if faster and cheaper:
        return "queue depth (KEDA ScaledObject): drains as fast or faster, no more pod-minutes"
    if faster:
        return "queue depth (KEDA ScaledObject): drains faster"
    return "CPU HPA (the current default)"


def _s(seconds: float) -> str:
    if math.isnan(seconds):
        return "not drained"
    return f"{seconds:,.0f} s" if seconds < 600 else f"{seconds / 60:,.1f} min"


def rows(scenarios: dict[str, Any], inputs: dict[str, Any], verdict: str) -> list[list[str]]:
    out: list[list[str]] = []
    c, r = inputs["chunk"], inputs["report"]
    out.append(
        [
            "5",
            "scaling model inputs (measured above)",
            f"refresh chunk {c['wall']:.2f} s ({c['cpu_fraction']:.0%} CPU), report "
            f"{r['wall'] * 1000:.0f} ms ({r['cpu_fraction']:.0%} CPU), compute_index "
            f"{inputs['compute_index']['wall']:.1f} s; pod ready {inputs['pod_start_s']:.0f} s",
            "",
            "",
            "",
        ]
    )
    for figures in scenarios.values():
        floor = figures["fixed10"]["drain_s"]
        base = f"fixed 10 pods {_s(floor)}; fixed 3 {_s(figures['fixed3']['drain_s'])}"
        for key in ("cpu", "keda"):
            f = figures[key]
            out.append(
                [
                    "5",
                    f"{figures['label']}: {f['label']}",
                    f"drained in {_s(f['drain_s'])}; peak {f['peak_pods']} pods, "
                    f"{f['extra_pod_minutes']:,.0f} pod-min above the 3 until back at 3",
                    base,
                    f"{f['drain_s'] / floor:.2f}x"
                    if floor and not math.isnan(f["drain_s"])
                    else "",
                    "",
                ]
            )
    out.append(["5", "scaling default the chart should use", verdict, "", "", ""])
    return out
