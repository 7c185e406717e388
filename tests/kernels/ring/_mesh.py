"""The mesh and the shard_map wrapper every ring test file uses."""

from collections.abc import Callable

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

from attnax.kernels.ring import RingLayout, from_ring_layout, to_ring_layout


def ring_mesh(size: int) -> Mesh:
    """A one-axis ("ring") mesh of ``size`` devices; skips when there are fewer."""
    devices = jax.devices()
    if len(devices) < size:
        pytest.skip(f"needs {size} devices (conftest sets 8 virtual CPU devices)")
    return Mesh(np.array(devices[:size]), ("ring",))


def in_global_order(
    body: Callable[..., jax.Array], mesh: Mesh, layout: RingLayout, *, check_vma: bool
) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
    """``body`` in shard_map over the sequence, taking and returning global-order arrays."""
    num_shards = mesh.shape["ring"]
    spec = PartitionSpec(None, None, "ring", None)  # type: ignore[no-untyped-call]
    mapped = jax.shard_map(
        body, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=check_vma
    )

    def run(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        arranged = (to_ring_layout(x, num_shards, layout) for x in (q, k, v))
        return from_ring_layout(mapped(*arranged), num_shards, layout)

    return run
