"""Datasheet figures of the GPUs the benchmarks run on, in one place (throughput.py, grpo_e2e.py, rollout_service.py,
gemm_shapes.py), and the BLAS library switch the GEMM comparisons share."""

import contextlib

# dense bf16 tensor-core peak in TFLOP/s (SXM parts), by a substring of torch.cuda.get_device_name()
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0, "B200": 2250.0}


def peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak TFLOP/s of the card named `device_name`, or None for a card not in PEAK_TFLOPS."""
    return next((tflops for key, tflops in PEAK_TFLOPS.items() if key in device_name), None)


def peak_flops(device_name: str) -> float | None:
    """`peak_tflops` in FLOP/s."""
    tflops = peak_tflops(device_name)
    return tflops * 1e12 if tflops else None


# nominal memory bandwidth in bytes/s (SXM parts): H200 HBM3e 4.8 TB/s, H100 SXM HBM3 3.35 TB/s
SPEC_BANDWIDTH = {"H200": 4.8e12, "H100 80GB HBM3": 3.35e12}


def spec_bandwidth(device_name: str) -> float | None:
    """Nominal memory bandwidth in bytes/s of the card named `device_name`, or None for a card not in
    SPEC_BANDWIDTH."""
    return next((bw for key, bw in SPEC_BANDWIDTH.items() if key in device_name), None)


@contextlib.contextmanager
def blas_library(name: str | None):
    """torch's preferred BLAS library set to `name` ("cublas" | "cublaslt") inside the block (None: unchanged), the
    previous one restored after it; CUDA graphs captured inside it keep that library's GEMM kernels."""
    import torch

    saved = torch.backends.cuda.preferred_blas_library()
    if name is not None:
        torch.backends.cuda.preferred_blas_library(name)
    try:
        yield
    finally:
        torch.backends.cuda.preferred_blas_library(saved)
