"""`make_mesh`: shapes, device use and the errors for impossible factorisations."""

from __future__ import annotations

import re

import jax
import pytest
from jax.sharding import AxisType

from kexue.parallel import MESH_AXES, make_mesh


@pytest.mark.parametrize(
    ("sizes", "shape"),
    [
        ((-1, 1, 1), (8, 1, 1)),
        ((2, 2, 2), (2, 2, 2)),
        ((-1, 2, 1), (4, 2, 1)),
        ((1, -1, 1), (1, 8, 1)),
        ((2, 1, -1), (2, 1, 4)),
        ((1, 1, 8), (1, 1, 8)),
    ],
)
def test_shape_and_every_device_once(sizes, shape):
    mesh = make_mesh(*sizes)
    assert mesh.axis_names == MESH_AXES == ("data", "fsdp", "tensor")
    assert tuple(mesh.shape.values()) == shape
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())
    assert mesh.axis_types == (AxisType.Auto,) * 3


def test_default_is_pure_data_parallel():
    assert dict(make_mesh().shape) == {"data": 8, "fsdp": 1, "tensor": 1}


def test_given_devices_keep_their_order():
    devices = jax.devices()[::-1]
    mesh = make_mesh(2, 2, 2, devices=devices)
    assert [d.id for d in mesh.devices.flat] == [d.id for d in devices]


def test_given_device_subset():
    mesh = make_mesh(1, -1, devices=jax.devices()[:4])
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 1}


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ((3, 1, 1), "`data`×`fsdp`×`tensor` = 3 does not equal the 8 devices"),
        ((2, 2, 1), "`data`×`fsdp`×`tensor` = 4 does not equal the 8 devices"),
        ((-1, 3, 1), "`fsdp`×`tensor` = 3 does not divide the 8 devices"),
        ((2, -1, 3), "`data`×`tensor` = 6 does not divide the 8 devices"),
        ((-1, -1, 1), "only one axis may be -1 (absorb the remaining devices); got `data`, `fsdp`"),
        ((0, 1, 1), "`data` must be a positive size or -1, got 0"),
        ((-1, 1, -2), "`tensor` must be a positive size or -1, got -2"),
        ((-1, 2.0, 1), "`fsdp` must be an int (a positive size or -1), got 2.0"),
    ],
)
def test_bad_factorisations_name_the_arguments(sizes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make_mesh(*sizes)


def test_given_devices_are_counted():
    with pytest.raises(ValueError, match=re.escape("= 8 does not equal the 4 devices")):
        make_mesh(2, 2, 2, devices=jax.devices()[:4])
