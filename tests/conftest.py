"""Test-suite set-up: shape checks on for everything, float32 matmuls at full precision on CPU."""

import os

os.environ.setdefault("ATTNAX_SHAPE_CHECKS", "1")
# Multi-device tests (ring attention) need virtual CPU devices, set before JAX starts. Test inputs
# are tiny, so compile time dominates: on CPU, LLVM's optimisation level 0 compiles about 25%
# faster and computes the same values. The flag also reaches the GPU compiler, so it is left out
# where an NVIDIA driver is present (GPU kernels are tested as they ship).
_ON_NVIDIA = os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia")
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8"
    + ("" if _ON_NVIDIA else " --xla_backend_optimization_level=0"),
)

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")  # type: ignore[no-untyped-call]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    on_gpu = jax.default_backend() == "gpu"
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not on_gpu:
            item.add_marker(skip_gpu)
