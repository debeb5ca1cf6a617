"""Test configuration: 8 fake CPU devices, offline Hugging Face, quiet transformers.

The XLA flags must be set before jax is imported anywhere, so they live at the top of conftest. On a GPU
(`JAX_PLATFORMS=cuda`), XLA's scatter-add reductions are non-deterministic unless `xla_gpu_deterministic_ops` is
set (the bit-for-bit SFT test fails without it); CPU runs ignore it. Tests marked `@pytest.mark.devices(n)` build
meshes of n devices and are skipped where fewer exist (one GPU has one).
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_gpu_deterministic_ops=true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_configure(config):
    config.addinivalue_line("markers", "devices(n): needs at least n devices (skipped where fewer exist)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        mark = item.get_closest_marker("devices")
        if mark is not None and jax.device_count() < mark.args[0]:
            item.add_marker(pytest.mark.skip(reason=f"needs {mark.args[0]} devices, {jax.device_count()} here "
                                                    "(the CPU suite fakes 8)"))
