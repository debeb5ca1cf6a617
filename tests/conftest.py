"""Test configuration: 8 fake CPU devices, offline Hugging Face, quiet transformers.

The XLA flags must be set before jax is imported anywhere, so they live at the top of conftest. On a GPU
(`JAX_PLATFORMS=cuda`), XLA's scatter-add reductions are non-deterministic unless `xla_gpu_deterministic_ops` is
set (the bit-for-bit SFT test fails without it); CPU runs ignore it. Tests marked `@pytest.mark.devices(n)` build
meshes of n devices and are skipped where fewer exist (one GPU has one); on the CPU backend, which fakes 8 devices,
fewer means the XLA flag above was lost (an XLA_FLAGS set outside without it), so there such a test fails instead of
being skipped without a word.
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


def device_shortfall(needed: int, available: int, backend: str) -> tuple[str, str] | None:
    """("skip" | "fail", reason) for a test that needs `needed` devices, or None when there are enough."""
    if available >= needed:
        return None
    if backend == "cpu":
        return "fail", (f"needs {needed} devices but the CPU backend has {available}: XLA_FLAGS lacks "
                        f"--xla_force_host_platform_device_count=8 (the CPU suite fakes 8 devices)")
    return "skip", f"needs {needed} devices, {available} here"


def pytest_runtest_setup(item):
    mark = item.get_closest_marker("devices")
    if mark is None:
        return
    verdict = device_shortfall(mark.args[0], jax.device_count(), jax.default_backend())
    if verdict is not None:
        action, reason = verdict
        (pytest.fail if action == "fail" else pytest.skip)(reason)
