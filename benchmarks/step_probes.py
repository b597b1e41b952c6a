"""What a measured step pays besides its own work, each as a small probe: Python GC pauses, the host's CPU use, Triton
kernels and torch.compile graphs compiled inside it, the CUDA allocator's retries. Used by grpo_e2e.py and
sampler_sizes.py; each records nothing where its subject is missing (no triton, no CUDA)."""

from __future__ import annotations

import gc
import resource
import threading
import time

import torch


class GCPauses:
    """Python's garbage-collector pauses while in use (`with GCPauses() as pauses:`): seconds and count of the
    collections of each generation (gc.callbacks). A full (generation-2) collection walks every object of the
    process (torch, inductor's compiled graphs: about 0.3-0.4 s on the 2-core CPU machine for a tiny compiled
    run); in a measured step it shows as step-time spread."""

    def __init__(self):
        self.seconds, self.count, self._start = [0.0, 0.0, 0.0], [0, 0, 0], None

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        elif self._start is not None:
            self.seconds[info["generation"]] += time.perf_counter() - self._start
            self.count[info["generation"]] += 1

    def __enter__(self):
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc):
        gc.callbacks.remove(self._callback)


class HostUse:
    """The host's side of a block (`with HostUse() as host:`): wall seconds, the calling thread's CPU seconds, the
    process's CPU seconds (every thread), its involuntary context switches (the OS took a CPU away: contention), the
    threads alive at the end, and a host-speed probe timed before the block (a fixed pure-Python loop; slower =
    a slower or busier host). A host-bound phase (the 0.5B update: the host launches kernels more slowly than the GPU
    runs them) stretches with each of these; a GPU-bound one does not."""

    PROBE_ITERATIONS = 1_000_000

    def __enter__(self):
        start = time.perf_counter()
        sum(i * i for i in range(self.PROBE_ITERATIONS))
        self.probe_s = time.perf_counter() - start
        self._start = (time.perf_counter(), time.thread_time(), time.process_time(),
                       resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw)
        return self

    def __exit__(self, *exc):
        end = (time.perf_counter(), time.thread_time(), time.process_time(),
               resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw)
        wall, thread_cpu, process_cpu, switches = (b - a for a, b in zip(self._start, end))
        self.summary = {"wall_s": wall, "thread_cpu_s": thread_cpu, "process_cpu_s": process_cpu,
                        "involuntary_switches": switches, "threads": threading.active_count(),
                        "probe_s": self.probe_s}


class TritonCompiles:
    """Triton kernels compiled while in use (`with TritonCompiles() as compiles:`; `compiles.names`, one entry per
    binary), through Triton's post-compile hook (the hook found there is called too). A measured step that compiles
    pays the compile (0.1-0.9 s of host time each), e.g. for an argument specialisation first met there. Records
    nothing on a CPU run (the interpreter compiles nothing) or where triton is missing."""

    def __enter__(self):
        self.names, self._knobs = [], None
        try:
            from triton import knobs
        except ImportError:
            return self
        self._knobs, self._previous = knobs.runtime, knobs.runtime.jit_post_compile_hook

        def hook(*, fn, **kwargs):
            self.names.append(fn.name)
            return self._previous(fn=fn, **kwargs) if self._previous else None

        self._knobs.jit_post_compile_hook = hook
        return self

    def __exit__(self, *exc):
        if self._knobs is not None:
            self._knobs.jit_post_compile_hook = self._previous


def dynamo_graphs() -> int:
    """Graphs torch.compile has compiled in this process so far (dynamo's `unique_graphs` counter): a measured step
    that adds some paid for a (re)compile, e.g. a shape or a grad mode first met there."""
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


def alloc_retries() -> int:
    """The CUDA caching allocator's retries so far in this process (0 without CUDA)."""
    return torch.cuda.memory_stats().get("num_alloc_retries", 0) if torch.cuda.is_available() else 0
