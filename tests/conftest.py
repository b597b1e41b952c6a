"""Session-wide test set-up.

Triton decides interpreter mode when a function is decorated, and its own library helpers
(`tl.sum`, ...) are decorated when triton is first imported — which megatron-core's import does
early in the session. For the Triton-on-CPU tests (tests/kernels, tests/models/test_fused_ops.py)
to run in the same process as everything else, triton is imported here once with
TRITON_INTERPRET=1, and the variable is removed again at once: code under test (and every
subprocess a test starts) takes its torch path on CPU; the Triton tests set the variable per test,
before our lazily imported kernel modules are decorated.
"""

import os

import torch

if not torch.cuda.is_available():
    _saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    import triton.language  # noqa: F401,E402  (decorate triton's own helpers in interpreter mode)
    if _saved is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _saved
