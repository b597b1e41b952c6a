"""verl_mega: Megatron-style RL post-training for LLMs (PPO, GRPO and kin)."""

from setuptools import find_packages, setup

setup(
    name="verl_mega",
    version="0.1.0",
    description="Megatron-style RL post-training (PPO/GRPO) with a HybridEngine, fused kernels and its own generation engine",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["verl_mega", "verl_mega.*"]),
    install_requires=[
        # Install torch first on CPU machines (`pip install torch==2.13.0`): a bare requirement may pull a CUDA build.
        "torch>=2.6",
        "megatron-core>=0.16.1,<0.20",  # 0.16.1 (Python 3.11) and 0.19.2 (GPU) tested
        "safetensors>=0.4",
        # 5.17, 5.24 and 5.25 verified (tiny test models bit-identical; engine parity + advantage tests pass);
        # 4.51 fails (from_config(dtype=)). Upper bound = newest verified: raise it after a green `.ci/run`.
        "transformers>=5.17,<5.26",
        "tokenizers>=0.21",
        "sentencepiece>=0.2",
        "numpy>=1.26",
        "pyarrow>=15",
        "pillow>=10",  # images of multimodal rows and the vision demo (13.0 tested)
        "omegaconf>=2.3",
        "tqdm>=4.66",
        "tensorboard>=2.15",
        "matplotlib>=3.8",
        "aiohttp>=3.9,<4",  # SandboxFusion HTTP client and `verl-mega sandbox serve` (3.14 tested)
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout>=2.3", "triton==3.6.0"],
        "gpu": ["triton>=3.2", "liger-kernel>=0.5"],
    },
    entry_points={"console_scripts": ["verl-mega=verl_mega.apps.cli:main"]},
)
