"""Where the GPU waits inside each profiled stage: busy time, idle gaps, and the host syncs behind them.

`torch.profiler`'s op tables say how long kernels ran, not how long the GPU sat idle between them. This
module reads the profiler's raw (kineto) events into plain `Event` records and, for every `stage/<name>`
host range (the trainer's stages are `record_function` ranges):
- busy: the union of the kernel, memcpy and memset intervals inside the range, against its span;
- idle: the gaps between them, each charged to the host op that launched the activity ending the gap (the
  GPU was waiting for that launch), e.g. `aten::_to_copy < Update.forward_backward`, or for a kernel no op
  launched (a CUDA-graph replay's) to the CUDA call behind it, e.g. `cudaGraphLaunch in (no host op)`;
- host waits: the time the host spent in blocking CUDA calls (synchronize, pageable copies), by the op
  that made the call: each one drains the GPU's queue, so the GPU idles until the host queues work again.
Pure Python over the records, so tests/test_profile_gaps.py checks it on hand-made events.
"""
from __future__ import annotations

import bisect
import re
from collections import defaultdict
from dataclasses import dataclass

import torch

DEVICE_KINDS = ("kernel", "gpu_memcpy", "gpu_memset")
HOST_KINDS = ("cpu_op", "user_annotation")
BLOCKING_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpyAsync",
                  "cudaMemcpy")


@dataclass(frozen=True)
class Event:
    """One profiler event; times in ns. `corr`: a host op's own id, or a CUDA call's / device activity's
    correlation id; `linked`: for a device activity or a CUDA call, the id of the host op that issued it."""
    name: str
    kind: str  # kineto activity type: cpu_op, user_annotation, cuda_runtime, kernel, gpu_memcpy, ...
    start: int
    end: int
    corr: int = 0
    linked: int = 0
    thread: int = 0


def from_profiler(prof) -> list[Event]:
    """The kineto events of a finished `torch.profiler.profile` as `Event`s."""
    out = []
    for e in prof.profiler.kineto_results.events():
        start, length = ((e.start_ns(), e.duration_ns()) if hasattr(e, "start_ns")
                         else (e.start_us() * 1000, e.duration_us() * 1000))
        out.append(Event(e.name(), kind_of(e), start, start + length, e.correlation_id(), e.linked_correlation_id(),
                         e.start_thread_id()))
    return out


_RUNTIME_CALL = re.compile(r"^cu(da)?[A-Z]")  # cudaLaunchKernel, cudaMemcpyAsync, cuLaunchKernelEx, ...


def kind_of(e) -> str:
    """A kineto event's activity type. torch >= 2.13 reports it (`activity_type()`); before that it is
    told from the device type, the user-annotation flag (where there is one) and the name."""
    if hasattr(e, "activity_type"):
        return e.activity_type()
    annotation = e.is_user_annotation() if hasattr(e, "is_user_annotation") else False
    if e.device_type() != torch.autograd.DeviceType.CPU:
        if annotation:
            return "gpu_user_annotation"
        name = e.name()
        return "gpu_memcpy" if name.startswith("Memcpy") else "gpu_memset" if name.startswith("Memset") else "kernel"
    if annotation or e.name().startswith("stage/"):
        return "user_annotation"
    return "cuda_runtime" if _RUNTIME_CALL.match(e.name()) else "cpu_op"


class _HostOps:
    """The host ops of each thread, nested: the chain of ops around a point in time."""

    def __init__(self, events: list[Event]):
        self.by_id = {e.corr: e for e in events if e.kind in HOST_KINDS}
        self.threads: dict[int, tuple[list[int], list[Event], list[int]]] = {}
        per_thread = defaultdict(list)
        for e in self.by_id.values():
            per_thread[e.thread].append(e)
        for thread, ops in per_thread.items():
            ops.sort(key=lambda e: (e.start, -e.end))
            parents, stack = [], []  # parent index of each op (-1: none), by a sweep over properly nested ranges
            for i, op in enumerate(ops):
                while stack and ops[stack[-1]].end < op.end:
                    stack.pop()
                parents.append(stack[-1] if stack else -1)
                stack.append(i)
            self.threads[thread] = ([op.start for op in ops], ops, parents)

    def chain(self, thread: int, t: int) -> list[Event]:
        """The ops of `thread` running at time t, innermost first."""
        starts, ops, parents = self.threads.get(thread, ([], [], []))
        i = bisect.bisect_right(starts, t) - 1
        while i >= 0 and ops[i].end < t:
            i = parents[i]
        out = []
        while i >= 0:
            out.append(ops[i])
            i = parents[i]
        return out

    def label(self, op: Event | None, thread: int | None = None, t: int | None = None) -> str:
        """'innermost < the nearest two enclosing ops that are not aten:: ops' for `op`, or for the ops of
        `thread` running at time t."""
        if op is not None:
            chain = self.chain(op.thread, (op.start + op.end) // 2)
            chain = chain[chain.index(op):] if op in chain else [op]
        else:
            chain = self.chain(thread, t)
        if not chain:
            return "(no host op)"
        outer = [e.name for e in chain[1:] if not e.name.startswith("aten::") and not e.name.startswith("stage/")]
        return " < ".join([chain[0].name[:60]] + [n[:60] for n in outer[:2]])


def _launch_label(act: Event, host: _HostOps, runtime: dict[int, Event]) -> str:
    """Who launched device activity `act`: its host op chain; else (e.g. a kernel of a CUDA-graph replay, which
    no op launches) the CUDA call with its correlation id, in the ops around that call."""
    launcher = host.by_id.get(act.linked)
    if launcher is not None:
        return host.label(launcher)
    call = runtime.get(act.corr)
    if call is not None:
        return f"{call.name} in {host.label(None, call.thread, call.start)}"
    return f"(unattributed) {act.name[:50]}"


def stage_report(events: list[Event], min_gap_us: float = 5.0, top: int = 10, min_stage_ms: float = 1.0) -> list[str]:
    """Text lines: for each `stage/` host range, its GPU span, busy and idle time, the idle time by the op
    that launched the activity after each gap (gaps >= min_gap_us), and the host's blocking CUDA calls."""
    host = _HostOps(events)
    device = sorted((e for e in events if e.kind in DEVICE_KINDS), key=lambda e: e.start)
    starts = [e.start for e in device]
    calls = [e for e in events if e.kind == "cuda_runtime" and e.name in BLOCKING_CALLS]
    runtime = {e.corr: e for e in events if e.kind in ("cuda_runtime", "cuda_driver")}
    lines = ["# GPU busy and idle inside each stage (ms): busy = union of kernels and copies within the stage's GPU "
             "span; idle gaps are charged to the host op that launched the activity ending the gap; host waits = "
             "blocking CUDA calls (each drains the GPU queue) by the op that made them"]
    stages = sorted((e for e in events if e.kind == "user_annotation" and e.name.startswith("stage/")),
                    key=lambda e: e.start)
    for stage in stages:
        if (stage.end - stage.start) / 1e6 < min_stage_ms:
            continue
        lo, hi = bisect.bisect_left(starts, stage.start), bisect.bisect_left(starts, stage.end)
        acts = device[lo:hi]
        if not acts:
            continue
        span_end = max(e.end for e in acts)
        busy, idle, reach = 0, defaultdict(lambda: [0, 0]), acts[0].start
        for e in acts:
            if e.start > reach and (e.start - reach) >= min_gap_us * 1e3:
                key = _launch_label(e, host, runtime)
                idle[key][0] += e.start - reach
                idle[key][1] += 1
            busy += max(0, e.end - max(e.start, reach))
            reach = max(reach, e.end)
        span = span_end - acts[0].start
        gaps = span - busy
        lines.append(f"{stage.name}: span {span / 1e6:.1f}  busy {busy / 1e6:.1f} ({100 * busy / span:.1f}%)  "
                     f"idle {gaps / 1e6:.1f}, of which in gaps >= {min_gap_us:g} us "
                     f"{sum(v[0] for v in idle.values()) / 1e6:.1f}")
        for key, (ns, count) in sorted(idle.items(), key=lambda kv: -kv[1][0])[:top]:
            lines.append(f"  idle {ns / 1e6:9.1f}  {count:6d}x  before {key}")
        waits = defaultdict(lambda: [0, 0])
        for c in calls:
            if stage.start <= c.start < stage.end:
                key = f"{c.name} in {host.label(None, c.thread, c.start)}"
                waits[key][0] += c.end - c.start
                waits[key][1] += 1
        for key, (ns, count) in sorted(waits.items(), key=lambda kv: -kv[1][0])[:top // 2]:
            lines.append(f"  host wait {ns / 1e6:9.1f}  {count:6d}x  {key}")
    return lines
