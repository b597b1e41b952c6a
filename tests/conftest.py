"""Session-wide test set-up.

Triton decides interpreter mode when a function is decorated, and its own library helpers
(`tl.sum`, ...) are decorated when triton is first imported — which megatron-core's import does
early in the session. For the Triton-on-CPU tests (tests/kernels, tests/models/test_fused_ops.py)
to work in the same process as everything else, TRITON_INTERPRET=1 must be set before that first
import. It is then *unset* around every test, so that code under test takes its torch path on CPU;
the Triton tests set it back per test (their own fixtures), before our lazily imported kernel
modules are decorated.
"""

import os

import pytest
import torch

_CPU_ONLY = not torch.cuda.is_available()
if _CPU_ONLY:
    os.environ["TRITON_INTERPRET"] = "1"
    import triton.language  # noqa: F401,E402  (decorate triton's own helpers in interpreter mode)


@pytest.fixture(autouse=True)
def _torch_paths_by_default(monkeypatch):
    if _CPU_ONLY:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    yield
