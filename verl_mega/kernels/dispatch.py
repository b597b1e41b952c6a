"""Choosing between a Triton kernel and its torch fallback.

`impl="auto"` takes Triton for CUDA tensors when triton imports, and for any tensor under
`TRITON_INTERPRET=1` (the interpreter runs the same kernels on CPU tensors: that is how the CPU tests
exercise them). `impl="triton"` insists (a clear ValueError where it cannot run), `impl="torch"`
takes the plain torch path everywhere.

The interpreter is chosen by triton when a kernel is *decorated*, i.e. when our `*_triton` module is
first imported: set `TRITON_INTERPRET=1` before that (the kernel modules are imported lazily, only
when a Triton path is taken).
"""

from __future__ import annotations

import functools
import inspect
import os

import torch

IMPLS = ("auto", "triton", "torch")


def interpret_mode() -> bool:
    """True when `TRITON_INTERPRET=1`: Triton kernels run in the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def size_stable_jit(sizes: tuple[str, ...] = (), unaligned: tuple[str, ...] = ()):
    """A decorator: `triton.jit` without specialising on the integer arguments named in `sizes` or on the
    alignment of the pointer arguments named in `unaligned` (names a kernel lacks are ignored).

    Triton compiles a kernel once per specialisation of its arguments (an integer divisible by 16 or equal
    to 1, a pointer 16-byte aligned or not); an argument that follows the batch (a row count, a chunk's
    offset, a view into a buffer sized by the batch) makes a new binary (0.1-0.9 s of host time) whenever a
    step first meets another residue. tests/kernels/test_kernel_specialization.py checks each kernel.
    triton is imported here, at decoration time (when TRITON_INTERPRET is read)."""
    import triton

    def decorate(fn):
        names = inspect.signature(fn).parameters
        return triton.jit(fn, do_not_specialize=[a for a in sizes if a in names],
                          do_not_specialize_on_alignment=[a for a in unaligned if a in names])
    return decorate


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when triton imports (it is an optional dependency on CPU machines)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether `impl="auto"` runs the Triton kernel on `tensor`."""
    if not triton_available():
        return False
    return tensor.is_cuda or interpret_mode()


def resolve_impl(impl: str, tensor: torch.Tensor) -> str:
    """Map `impl` ("auto" | "triton" | "torch") to the path taken for `tensor`: "triton" or "torch"."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if use_triton(tensor) else "torch"
    if impl == "triton" and not use_triton(tensor):
        why = "triton is not importable" if not triton_available() else \
            f"the tensor is on {tensor.device} (Triton needs CUDA, or TRITON_INTERPRET=1 for CPU tensors)"
        raise ValueError(f"impl='triton' cannot run: {why}")
    return impl


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (a device without an index: the current one); for sizing grids."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
