"""Builds the ('data', 'fsdp', 'tensor') device mesh from config sizes."""

import logging
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "tensor")

# With every axis > 1, XLA (jaxlib 0.10.2, Shardy and GSPMD alike) drops part of a gradient's reduction: a conv
# whose pooled output meets an ('fsdp', 'tensor')-sharded head gets a weight gradient off by ~100%.
# tests/test_sharding.py::test_xla_three_axis_mesh_gradient_bug pins it (strict xfail: it fails once XLA is fixed).
THREE_AXIS_WARNING = ("mesh {shape}: with data, fsdp and tensor all > 1, this XLA computes some gradients wrongly "
                      "(see hybrid_jax/parallel/mesh.py); keep one of the three axes at 1")


def resolve_mesh_shape(sizes: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Replaces one -1 in `sizes` by whatever makes the product equal `num_devices`."""
    sizes = list(sizes)
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh sizes {sizes}: at most one axis may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"mesh sizes {sizes} do not divide the {num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // known
    if int(np.prod(sizes)) != num_devices:
        raise ValueError(f"mesh sizes {sizes} need {int(np.prod(sizes))} devices, but {num_devices} are present; "
                         "set one size to -1 to use the rest")
    return tuple(sizes)


def make_mesh(sizes: Sequence[int] = (-1, 1, 1), axis_names: Sequence[str] = MESH_AXES,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over `devices` (default: all) with one size per axis; -1 takes the rest."""
    devices = jax.devices() if devices is None else list(devices)
    shape = resolve_mesh_shape(sizes, len(devices))
    if len(shape) == 3 and min(shape) > 1:
        logging.warning(THREE_AXIS_WARNING.format(shape=shape))
    # Auto axes: GSPMD propagates shardings from the logical constraints we place.
    axis_types = (AxisType.Auto,) * len(shape)
    if len(devices) == len(jax.devices()):
        # Let jax order devices for the interconnect (ICI rings on TPU, NVLink on GPU).
        return jax.make_mesh(shape, tuple(axis_names), axis_types=axis_types, devices=devices)
    return Mesh(np.asarray(devices).reshape(shape), tuple(axis_names), axis_types=axis_types)
