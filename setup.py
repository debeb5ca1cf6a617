"""jaxrl_reason: reinforcement learning of reasoning in language models, in JAX / Flax NNX."""
from setuptools import find_packages, setup

setup(
    name="jaxrl_reason",
    version="0.1.0",
    description="RL for reasoning LMs (autoregressive and masked-diffusion) in JAX / Flax NNX.",
    python_requires=">=3.11,<3.12",
    # configs, the study and the entry points' package install beside the library: `python experiments/train.py`
    # puts experiments/ (not the repository root) on sys.path, so they are imported from the installed project.
    packages=find_packages(include=["jaxrl_reason", "jaxrl_reason.*", "configs", "study", "experiments"]),
    install_requires=[
        "jax>=0.10.2,<0.11",
        "jaxlib>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "transformers>=5.23,<6",
        "tokenizers>=0.23,<0.24",
        "safetensors>=0.8,<0.9",
        "ml-collections>=1.1,<2",
        "absl-py>=2.5,<3",
        "numpy>=2.4,<3",
        "tensorflow-datasets>=4.9.10,<5",
        "array-record>=0.8.6,<0.9",
        "math-verify>=0.9,<0.10",
        "tqdm",
        "tensorboardX>=2.6",
    ],
    extras_require={
        # torch is pinned exactly: an unpinned torch pulls a multi-GB CUDA build.
        # pytest-xdist: the README runs the suite on both cores (`-n 2`); compiles are single-threaded.
        # libtpu: the compile check's TPU targets are compiled on the CPU through it (the version jax[tpu] pins).
        "test": ["pytest>=9.2,<10", "pytest-xdist>=3.8,<4", "torch==2.13.0", "reasoning-gym>=0.1.25",
                 "matplotlib>=3.10", "datasets>=5.2,<6", "nbclient>=0.11", "ipykernel>=7.4", "jupytext>=1.19", "libtpu==0.0.42.*"],
        "data": ["reasoning-gym>=0.1.25", "datasets>=5.2,<6"],
        "nb": ["nbclient>=0.11", "ipykernel>=7.4", "jupytext>=1.19", "matplotlib>=3.10"],
    },
)
