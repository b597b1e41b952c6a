"""Kernel tests: the Triton interpreter for CPU runs.

Without CUDA the Triton kernels run on CPU tensors under TRITON_INTERPRET=1. It is set per test
(monkeypatch), before the lazily imported kernel modules are decorated, and removed afterwards so
that other test areas keep the torch path. With CUDA the same tests run the compiled kernels.
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def _triton_interpreter(monkeypatch):
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield
