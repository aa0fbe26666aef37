"""The device mesh: three named axes that every kexue model and rule refers to.

* `data`   — pure data parallelism: parameters replicated, the batch split.
* `fsdp`   — fully sharded data parallelism: the batch *and* the parameters split
  (ZeRO-3 style; XLA all-gathers a weight just before it is used).
* `tensor` — tensor (model) parallelism: MLP, attention-head and vocabulary
  dimensions split, activations all-reduced inside a layer.

The axes are ordered outermost-first, so `data` spans the slowest links (across
hosts) and `tensor` the fastest (within a host or chip). Which array dimension goes
to which axis is decided by `kexue.parallel.rules`, not here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

MESH_AXES: tuple[str, str, str] = ("data", "fsdp", "tensor")


def _mesh_shape(sizes: dict[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolves a single -1 entry of `sizes` and checks the product against the devices."""
    for name, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, int | np.integer):
            raise ValueError(f"`{name}` must be an int (a positive size or -1), got {size!r}")
        if size == 0 or size < -1:
            raise ValueError(f"`{name}` must be a positive size or -1, got {size}")
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1:
        names = ", ".join(f"`{name}`" for name in free)
        raise ValueError(f"only one axis may be -1 (absorb the remaining devices); got {names}")
    fixed = {name: int(size) for name, size in sizes.items() if size != -1}
    product = math.prod(fixed.values())
    label = "×".join(f"`{name}`" for name in fixed)
    if free:
        if num_devices % product:
            raise ValueError(f"{label} = {product} does not divide the {num_devices} devices")
        fixed[free[0]] = num_devices // product
    elif product != num_devices:
        raise ValueError(
            f"{label} = {product} does not equal the {num_devices} devices; "
            "set one axis to -1 to absorb the remaining devices"
        )
    return tuple(fixed[name] for name in sizes)


def make_mesh(
    data: int = -1,
    fsdp: int = 1,
    tensor: int = 1,
    *,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """Builds a `("data", "fsdp", "tensor")` mesh over all devices.

    At most one size may be -1; it takes whatever the others leave. The default
    `make_mesh()` is pure data parallelism; since `data` defaults to -1, moving the
    -1 elsewhere means giving `data` too: `make_mesh(1, -1)` is pure FSDP. The
    product of the sizes must equal the device count (no device is left idle).

    Args:
      data, fsdp, tensor: axis sizes, positive or -1.
      devices: the devices to arrange, in the order given (row-major over the axes).
        By default all global devices (`jax.devices()`), ordered by `jax.make_mesh`
        to follow the physical topology (rings on TPU; plain order on CPU/GPU).

    Returns:
      A `jax.sharding.Mesh` whose axes are all `AxisType.Auto`: shardings are hints
      that XLA's partitioner propagates, the usual GSPMD model of
      `jax.lax.with_sharding_constraint`.

    Raises:
      ValueError: a size is not positive or -1, two sizes are -1, or the product
        does not divide (with a -1) / equal (without) the device count; the message
        names the arguments involved.
    """
    device_list = jax.devices() if devices is None else list(devices)
    shape = _mesh_shape({"data": data, "fsdp": fsdp, "tensor": tensor}, len(device_list))
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if devices is None:
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=device_list)
    grid = np.empty(len(device_list), dtype=object)
    grid[:] = device_list
    return Mesh(grid.reshape(shape), MESH_AXES, axis_types=axis_types)
