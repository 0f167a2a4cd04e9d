"""dynamo-jax: DynaMO (dynamic rollout allocation + advantage modulation) RLVR in JAX.

Ranges below are the ones we test against; CI installs the exact pinned set in
requirements/ci.txt (see docs/ and ../shared/ENVIRONMENT.md).
"""

from setuptools import find_packages, setup

setup(
    name="dynamo_jax",
    version="0.1.0",
    description="DynaMO: variance-minimising rollout allocation and entropy-aware advantage "
    "modulation for RL with verifiable rewards, in JAX.",
    python_requires=">=3.11",
    packages=find_packages(include=["dynamo_jax", "dynamo_jax.*", "experiments", "configs"]),
    install_requires=[
        "jax>=0.10.2,<0.11",
        "jaxlib>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "chex>=0.1.92",
        "ml_collections>=1.1.0,<2",
        "numpy>=2.0,<3",
        "grain>=0.2.18,<0.3",
        "array_record>=0.8.6",
        "sentencepiece>=0.2.3,<0.3",
        "transformers>=5.24.0,<6",
        "tokenizers>=0.23.3",
        "safetensors>=0.8.0",
        "math-verify>=0.9.0,<0.10",
        "tensorflow-datasets>=4.9.10,<5",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
        "pyarrow>=17",
    ],
    extras_require={
        "test": [
            "pytest>=9.2.0",
            "hypothesis>=6.100",
            "ruff>=0.6",
            "nbmake>=1.5.5",
            # tests/test_analysis.py, tests/test_notebooks.py
            "scipy>=1.11",
            "matplotlib>=3.8",
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel>=6.29",
        ],
        # CPU torch for weight conversion and PyTorch parity tests; 2.13.0 is the wheel we test.
        "hf": ["torch==2.13.0"],
        "notebooks": [
            "matplotlib>=3.8",
            "pandas>=2.2",
            "nbmake>=1.5.5",
            "ipykernel",
            "nbclient>=0.10",
            "nbformat>=5.10",
        ],
    },
)
