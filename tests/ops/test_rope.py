"""RoPE against explicit float64 rotation matrices, plus relativity, norm, and transform checks."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given, settings
from hypothesis import strategies as st

from kexue.ops.rope import apply_rope, apply_rope_nd, rope_frequencies, rope_sin_cos
from tests.ops._variants import VARIANT_EXAMPLES, OpsTestCase

TOL = {"rtol": 1e-5, "atol": 2e-5}


def pair_indices(rotary_dim, layout, start=0):
    """Feature index pairs (a, b) rotated together, for a block of `rotary_dim` features."""
    half = rotary_dim // 2
    if layout == "interleaved":
        return [(start + 2 * i, start + 2 * i + 1) for i in range(half)]
    return [(start + i, start + i + half) for i in range(half)]


def rotation_matrix(positions, d, rotary_dim, layout, base=10000.0, derivative=False):
    """Float64 `[d, d]` RoPE matrix for one token; `positions` holds one entry per axis.

    The rotary features split into `len(positions)` blocks; block `j` rotates by
    `positions[j]` with frequencies `base^(-2i/block)`. With `derivative`, returns
    `dR/dm` of a single-axis rotation instead.
    """
    positions = np.atleast_1d(np.asarray(positions, np.float64))
    block = rotary_dim // len(positions)
    r = np.zeros((d, d)) if derivative else np.eye(d)
    for axis, m in enumerate(positions):
        for i, (a, b) in enumerate(pair_indices(block, layout, start=axis * block)):
            theta = base ** (-2.0 * i / block)
            c, s = np.cos(m * theta), np.sin(m * theta)
            if derivative:
                r[a, a], r[a, b], r[b, a], r[b, b] = -s * theta, -c * theta, c * theta, -s * theta
            else:
                r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
    return r


def rope_reference(x, positions, rotary_dim=None, layout="interleaved", base=10000.0,
                   derivative=False, nd=False):
    """Apply per-token matrices: x `[..., n, h, d]`, positions `[..., n]` (`[..., n, k]` if nd)."""
    x = np.asarray(x, np.float64)
    d = x.shape[-1]
    rotary_dim = d if rotary_dim is None else rotary_dim
    positions = np.asarray(positions, np.float64)
    if not nd:
        positions = positions[..., None]
    positions = np.broadcast_to(positions, (*x.shape[:-2], positions.shape[-1]))
    out = np.empty_like(x)
    for idx in np.ndindex(*x.shape[:-2]):
        r = rotation_matrix(positions[idx], d, rotary_dim, layout, base, derivative)
        out[idx] = x[idx] @ r.T
    return out


def randn(rng, *shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


# ------------------------------------------------------------------- frequencies


@pytest.mark.parametrize(("rotary_dim", "base"), [(8, 10000.0), (6, 500.0), (64, 10000)])
def test_rope_frequencies_formula(rotary_dim, base):
    got = rope_frequencies(rotary_dim, base)
    expected = [base ** (-2.0 * i / rotary_dim) for i in range(rotary_dim // 2)]
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, expected, rtol=1e-7)


LAYOUTS = ("interleaved", "half")


class TestRopeJittedAndEager(OpsTestCase):
    """Each check runs under `jax.jit` (positions traced) and eagerly (host positions)."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_rope_sin_cos_formula(self):
        positions = self.rng.uniform(-30, 30, size=(2, 5)).astype(np.float32)
        sin, cos = self.variant(lambda p: rope_sin_cos(p, 6, base=100.0))(positions)
        angles = positions.astype(np.float64)[..., None] * 100.0 ** (-np.arange(3) * 2.0 / 6)
        assert sin.shape == cos.shape == (2, 5, 3) and sin.dtype == cos.dtype == jnp.float32
        np.testing.assert_allclose(sin, np.sin(angles), atol=1e-5)
        np.testing.assert_allclose(cos, np.cos(angles), atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(layout=LAYOUTS, rotary_dim=[None, 4], float_positions=[False, True])
    def test_apply_rope_matches_rotation_matrices(self, layout, rotary_dim, float_positions):
        x = randn(self.rng, 2, 5, 3, 10)
        if float_positions:
            positions = self.rng.uniform(-40, 40, size=(2, 5)).astype(np.float32)
        else:
            positions = self.rng.integers(0, 60, size=(2, 5)).astype(np.int32)
        got = self.variant(lambda x, p: apply_rope(x, p, layout=layout, rotary_dim=rotary_dim,
                                                   base=1000.0))(x, positions)
        assert got.shape == x.shape and got.dtype == jnp.float32
        np.testing.assert_allclose(got, rope_reference(x, positions, rotary_dim, layout, 1000.0),
                                   **TOL)
        if rotary_dim is not None:  # the pass-through features are untouched, bit for bit
            np.testing.assert_array_equal(np.asarray(got)[..., rotary_dim:],
                                          x[..., rotary_dim:])

    @chex.variants(with_jit=True, without_jit=True)
    def test_apply_rope_default_positions_and_shared_positions(self):
        x = randn(self.rng, 2, 6, 2, 8)
        expected = rope_reference(x, np.arange(6))
        np.testing.assert_allclose(self.variant(apply_rope)(x), expected, **TOL)
        np.testing.assert_allclose(self.variant(apply_rope)(x, np.arange(6)), expected, **TOL)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*LAYOUTS)
    def test_seq_axis_rotates_heads_first_and_headless_inputs_by_position(self, layout):
        """`[b, h, n, d]` and `[n, d]` with `seq_axis=-2`: every head rotates by the position."""
        b, h, n, d = 2, 3, 5, 8
        x = randn(self.rng, b, h, n, d)
        positions = self.rng.integers(0, 60, size=(b, n)).astype(np.int32)
        # The reference works on [b, n, h, d]: move the heads behind the sequence and back.
        expected = np.swapaxes(rope_reference(np.swapaxes(x, 1, 2), positions, layout=layout),
                               1, 2)
        heads_first = self.variant(
            lambda x, p, axis: apply_rope(x, p, layout=layout, seq_axis=axis),
            static_argnums=2)
        got = heads_first(x, positions[:, None, :], -2)
        np.testing.assert_allclose(got, expected, **TOL)
        np.testing.assert_allclose(heads_first(x, positions[:, None, :], 2), got, **TOL)
        default = np.swapaxes(rope_reference(np.swapaxes(x, 1, 2), np.arange(n), layout=layout),
                              1, 2)
        np.testing.assert_allclose(heads_first(x, None, -2), default, **TOL)
        cached = self.variant(lambda x, p: apply_rope(
            x, sin_cos=rope_sin_cos(p, d), layout=layout, seq_axis=-2))
        np.testing.assert_allclose(cached(x, positions[:, None, :]), expected, **TOL)
        headless = heads_first(x[0, 0], positions[0], -2)
        np.testing.assert_allclose(headless, expected[0, 0], **TOL)
        grid = self.rng.integers(0, 9, size=(b, 1, n, 2)).astype(np.int32)
        expected_nd = np.swapaxes(rope_reference(np.swapaxes(x, 1, 2), grid[:, 0],
                                                 layout=layout, nd=True), 1, 2)
        got_nd = self.variant(lambda x, p: apply_rope_nd(x, p, layout=layout, seq_axis=-2))(
            x, grid)
        np.testing.assert_allclose(got_nd, expected_nd, **TOL)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*LAYOUTS)
    def test_sin_cos_cache_equals_positions_path(self, layout):
        x = randn(self.rng, 3, 7, 2, 12)
        positions = self.rng.uniform(0, 100, size=(3, 7)).astype(np.float32)
        cached = self.variant(lambda x, p: apply_rope(
            x, sin_cos=rope_sin_cos(p, 8, base=500.0), layout=layout, rotary_dim=8))
        direct = self.variant(lambda x, p: apply_rope(x, p, base=500.0, layout=layout,
                                                      rotary_dim=8))
        np.testing.assert_array_equal(cached(x, positions), direct(x, positions))
        # A cache for `[n]` positions serves every batch entry.
        shared = self.variant(lambda x, p: apply_rope(x, sin_cos=rope_sin_cos(p, 12),
                                                      layout=layout))
        np.testing.assert_allclose(shared(x, positions[0]),
                                   rope_reference(x, positions[0], layout=layout), **TOL)

    # ------------------------------------------------------------ defining property

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*LAYOUTS)
    def test_relativity_and_norm(self, layout):
        rope = self.variant(lambda x, p: apply_rope(x, p, layout=layout))
        q, k = randn(self.rng, 1, 4, 16), randn(self.rng, 1, 4, 16)
        for _ in range(5):
            m, n, shift = self.rng.uniform(-50, 50, size=3)
            base_score = rope_dot(rope, q, k, m, n)
            np.testing.assert_allclose(rope_dot(rope, q, k, m + shift, n + shift), base_score,
                                       rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(rope_dot(rope, q, k, 0.0, n - m), base_score,
                                       rtol=1e-4, atol=1e-4)
        x = randn(self.rng, 3, 5, 2, 16)
        positions = self.rng.uniform(-100, 100, size=(3, 5)).astype(np.float32)
        rotated = rope(x, positions)
        np.testing.assert_allclose(np.linalg.norm(rotated, axis=-1),
                                   np.linalg.norm(x, axis=-1), rtol=1e-5)
        np.testing.assert_allclose(rope(rotated, -positions), x, **TOL)

    @chex.variants(with_jit=True, without_jit=True)
    @settings(max_examples=VARIANT_EXAMPLES)
    @given(m=st.integers(-2000, 2000), n=st.integers(-2000, 2000),
           shift=st.integers(-2000, 2000))
    def test_relativity_integer_positions(self, m, n, shift):
        rope = self.variant(lambda x, p: apply_rope(x, p, layout="interleaved"))
        rng = np.random.default_rng(abs(m) + 7 * abs(n))
        q, k = randn(rng, 1, 2, 8), randn(rng, 1, 2, 8)
        np.testing.assert_allclose(rope_dot(rope, q, k, m + shift, n + shift),
                                   rope_dot(rope, q, k, m, n), rtol=2e-3, atol=2e-3)

    # -------------------------------------------------------------------------- N-D

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(layout=LAYOUTS, shape=[(2, 8, None), (3, 14, 12), (2, 10, 8)])
    def test_apply_rope_nd_matches_block_rotation(self, layout, shape):
        axes, d, rotary_dim = shape
        x = randn(self.rng, 2, 6, 2, d)
        positions = self.rng.uniform(-20, 20, size=(2, 6, axes)).astype(np.float32)
        got = self.variant(lambda x, p: apply_rope_nd(x, p, layout=layout, rotary_dim=rotary_dim,
                                                      base=100.0))(x, positions)
        assert got.shape == x.shape and got.dtype == x.dtype
        expected = rope_reference(x, positions, rotary_dim, layout, 100.0, nd=True)
        np.testing.assert_allclose(got, expected, **TOL)

    @chex.variants(with_jit=True, without_jit=True)
    def test_apply_rope_nd_one_axis_is_apply_rope(self):
        x = randn(self.rng, 2, 5, 3, 8)
        positions = self.rng.integers(0, 50, size=(2, 5)).astype(np.int32)
        nd = self.variant(lambda x, p: apply_rope_nd(x, p[..., None], layout="half"))
        one = self.variant(lambda x, p: apply_rope(x, p, layout="half"))
        np.testing.assert_allclose(nd(x, positions), one(x, positions), rtol=1e-6, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_apply_rope_nd_relativity_on_a_grid(self):
        # Image patches at (row, col): scores depend only on the 2-D offset.
        rope = self.variant(apply_rope_nd)
        q, k = randn(self.rng, 1, 2, 16), randn(self.rng, 1, 2, 16)

        def score(pq, pk):
            rq = rope(q, jnp.asarray([pq], jnp.int32))
            rk = rope(k, jnp.asarray([pk], jnp.int32))
            return np.sum(np.asarray(rq, np.float64) * np.asarray(rk, np.float64), axis=-1)

        for _ in range(4):
            pq, pk, shift = (self.rng.integers(0, 32, size=2) for _ in range(3))
            np.testing.assert_allclose(score(pq + shift, pk + shift), score(pq, pk),
                                       rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(score(np.zeros(2, int), pk - pq), score(pq, pk),
                                       rtol=1e-4, atol=1e-4)


def rope_dot(rope, q, k, m, n):
    """<R_m q, R_n k> per head, for one query at position m and one key at n."""
    rq = rope(q, jnp.asarray([m], jnp.float32))
    rk = rope(k, jnp.asarray([n], jnp.float32))
    return np.sum(np.asarray(rq, np.float64) * np.asarray(rk, np.float64), axis=-1)


# ---------------------------------------------------------------------- transforms


def test_jit_vmap_and_grad(rng):
    x = randn(rng, 4, 5, 2, 8)
    w = randn(rng, 4, 5, 2, 8)
    positions = rng.uniform(-10, 10, size=(4, 5)).astype(np.float32)
    expected = rope_reference(x, positions, layout="half")
    fn = jax.jit(lambda x, p: apply_rope(x, p, layout="half"))
    np.testing.assert_allclose(fn(x, positions), expected, **TOL)
    np.testing.assert_allclose(jax.vmap(lambda x, p: apply_rope(x, p, layout="half"))(
        x, positions), expected, **TOL)

    def loss(x, p):
        return jnp.sum(w * apply_rope(x, p, layout="half"))

    gx, gp = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, positions)
    # d/dx <w, R_m x> = R_mᵀ w, and d/dm <w, R_m x> = <w, (dR/dm) x>.
    np.testing.assert_allclose(gx, rope_reference(w, -positions, layout="half"), **TOL)
    dr_x = rope_reference(x, positions, layout="half", derivative=True)
    np.testing.assert_allclose(gp, np.sum(w * dr_x, axis=(-2, -1)), rtol=1e-4, atol=1e-4)


def test_bfloat16_keeps_dtype(rng):
    x = randn(rng, 2, 5, 2, 8).astype(jnp.bfloat16)
    positions = rng.uniform(0, 100, size=(2, 5)).astype(np.float32)
    got = apply_rope(x, positions)
    assert got.dtype == jnp.bfloat16
    expected = rope_reference(np.asarray(x, np.float32), positions)
    np.testing.assert_allclose(np.asarray(got, np.float32), expected, rtol=2e-2, atol=2e-2)
    got_nd = apply_rope_nd(x, np.stack([positions, positions], -1), rotary_dim=4)
    assert got_nd.dtype == jnp.bfloat16


def test_sharded_input_gives_same_result(rng):
    devices = np.array(jax.devices()[:8])
    if devices.size < 8:
        pytest.skip("needs 8 devices")
    mesh = jax.sharding.Mesh(devices, ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    x = randn(rng, 8, 4, 2, 8)
    positions = rng.integers(0, 100, size=(8, 4)).astype(np.int32)
    got = jax.jit(apply_rope)(jax.device_put(x, sharding), jax.device_put(positions, sharding))
    np.testing.assert_allclose(got, rope_reference(x, positions), **TOL)
    assert got.sharding.is_equivalent_to(sharding, got.ndim)


# -------------------------------------------------------------------------- errors


def test_rope_errors_name_the_argument():
    x = np.zeros((2, 5, 3, 8), np.float32)
    with pytest.raises(ValueError, match=r"`layout` must be one of \['interleaved', 'half'\]"):
        apply_rope(x, layout="neox")
    with pytest.raises(ValueError, match=r"`rotary_dim` must be a positive multiple of 2; got 5"):
        apply_rope(x, rotary_dim=5)
    with pytest.raises(ValueError, match=r"`rotary_dim` must be at most the head dim.*=10"):
        apply_rope(x, rotary_dim=10)
    with pytest.raises(ValueError, match=r"`x` must have at least 3 axes.*\(5, 8\)"):
        apply_rope(np.zeros((5, 8), np.float32))
    with pytest.raises(ValueError, match=r"`x` must be a floating-point array; got dtype int32"):
        apply_rope(np.zeros((5, 2, 8), np.int32))
    with pytest.raises(ValueError, match=r"`positions` with shape \(4,\) does not broadcast"):
        apply_rope(x, np.arange(4))
    with pytest.raises(ValueError, match=r"`positions` must have a integer or floating dtype"):
        apply_rope(x, np.ones(5, bool))
    with pytest.raises(ValueError, match=r"either `positions` or `sin_cos`"):
        apply_rope(x, np.arange(5), sin_cos=rope_sin_cos(np.arange(5), 8))
    with pytest.raises(ValueError, match=r"`sin_cos\[0\]` must have size 4 on axis -1"):
        apply_rope(x, sin_cos=rope_sin_cos(np.arange(5), 6))
    with pytest.raises(ValueError, match=r"`base` must be a finite number greater than 1; got 1.0"):
        apply_rope(x, base=1.0)
    for bad in (-1, 3, -5, 1.0, True):
        with pytest.raises(ValueError, match=r"`seq_axis` must"):
            apply_rope(x, seq_axis=bad)
    with pytest.raises(ValueError, match=r"`seq_axis` must name an axis .* got -1"):
        apply_rope_nd(x, np.zeros((5, 2), np.int32), seq_axis=-1)
    with pytest.raises(ValueError, match=r"`positions` .* does not broadcast .*x.shape\[:seq_axis"):
        apply_rope(x, np.arange(5), seq_axis=-2)  # [b, n, h, d] read as [b, n, h] + d: n = 3
    with pytest.raises(ValueError, match=r"`positions` must have at least 2 axes"):
        apply_rope_nd(x, np.arange(5))
    with pytest.raises(ValueError, match=r"divisible by 2k = 6"):
        apply_rope_nd(x, np.zeros((5, 3), np.int32))
    with pytest.raises(ValueError, match=r"`rotary_dim` must be a positive multiple of 4; got 6"):
        apply_rope_nd(x, np.zeros((5, 2), np.int32), rotary_dim=6)


@pytest.mark.parametrize("layout", ["interleaved", "half"])
def test_host_positions_are_exact_and_precomputed(rng, layout):
    """Positions known at trace time give a float64-exact table, embedded as a constant.

    Large positions expose float32 angle rounding (m·θ with m ~ 1e5 loses ~1e-2 rad), so
    host positions must match the float64 reference much more tightly than traced ones.
    Under jit the default `arange(n)` path must not leave sin/cos in the compiled loop.
    """
    n, h, d = 6, 2, 16
    x = rng.normal(size=(n, h, d)).astype(np.float32)
    positions = rng.integers(50_000, 200_000, size=n)
    expected = rope_reference(x, positions, layout=layout)
    host = apply_rope(x, positions, layout=layout)
    np.testing.assert_allclose(host, expected, rtol=1e-5, atol=1e-5)
    traced = jax.jit(lambda x, p: apply_rope(x, p, layout=layout))(x, positions)
    np.testing.assert_allclose(traced, expected, atol=0.1)
    assert np.max(np.abs(np.asarray(host) - expected)) < np.max(np.abs(np.asarray(traced)
                                                                        - expected))

    hlo = jax.jit(lambda x: apply_rope(x, layout=layout)).lower(x).compile().as_text()
    assert "sine(" not in hlo and "cosine(" not in hlo


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks XLA:CPU's fusion decisions")
def test_traced_positions_table_is_computed_outside_the_rotation_loop(rng):
    """Positions traced under jit: the sin/cos table is computed once per table entry.

    The compiled computation that writes the rotated `[b, n, h, d]` array (the loop over
    every element) must only read the table, not evaluate a transcendental per element.
    """
    x = rng.normal(size=(3, 8, 2, 16)).astype(np.float32)
    positions = rng.uniform(0, 100, size=(3, 8)).astype(np.float32)
    fn = jax.jit(lambda x, p: apply_rope(x, p))
    np.testing.assert_allclose(fn(x, positions), rope_reference(x, positions), **TOL)
    hlo = fn.lower(x, positions).compile().as_text()
    computations = [block.strip() for block in hlo.split("\n\n") if "ROOT" in block]
    loops = [block for block in computations
             if block.startswith("%") and "-> f32[3,8,2,16]" in block.split("\n")[0]]
    assert loops, hlo
    for block in loops:
        assert not any(op in block for op in ("tan(", "sine(", "cosine(")), block


@pytest.mark.parametrize("integer", [False, True])
def test_traced_sin_cos_match_float64_of_the_float32_angles(rng, integer):
    """Traced positions: sin/cos within 3e-7 of the float64 values at the float32 angles.

    The angles `m·θ` are rounded to float32 as documented; the table computed from them
    on the device must add no more than a few ulp. Positions cover every quadrant and
    magnitudes up to 1e5 radians.
    """
    if integer:
        positions = rng.integers(-100_000, 100_000, size=(4, 257)).astype(np.int32)
    else:
        positions = rng.uniform(-100_000, 100_000, size=(4, 257)).astype(np.float32)
    rotary_dim = 16
    sin, cos = jax.jit(lambda p: rope_sin_cos(p, rotary_dim, base=100.0))(positions)
    theta32 = np.power(100.0, np.arange(rotary_dim // 2) * (-2.0 / rotary_dim)).astype(np.float32)
    angles = (positions.astype(np.float32)[..., None] * theta32).astype(np.float64)
    assert sin.dtype == jnp.float32 and sin.shape == angles.shape
    np.testing.assert_allclose(sin, np.sin(angles), rtol=0, atol=3e-7)
    np.testing.assert_allclose(cos, np.cos(angles), rtol=0, atol=3e-7)
