"""The one-pass statistical top-k kernel (Pallas, interpret mode) against its plain-JAX twin."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import topk
from sparsejax.kernels import statistical_topk as st


# Inputs are drawn with numpy and the references run jitted, as one program each: run op by
# op, each new shape of every operation was a program of its own to compile (most of this
# file's time). The kernels are called as before.


def _rows(seed, shape, dtype=jnp.float32):
    # A per-row mean and scale, so the statistics are not those of a standard normal.
    return jnp.asarray(_np_rows(seed, shape, dtype))


def _np_rows(seed, shape, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    mean = rng.standard_normal(shape[:-1] + (1,)) * 3.0
    scale = np.exp(rng.standard_normal(shape[:-1] + (1,)))
    return (mean + scale * rng.standard_normal(shape)).astype(np.float32).astype(dtype)


def _normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def _jit(f, *args, **kwargs):
    """``f(*args, **kwargs)`` as one compiled program (``kwargs`` static)."""
    return jax.jit(functools.partial(f, **kwargs))(*args)


def _assert_close(a, b, dtype):
    a, b = np.asarray(a).astype(np.float32), np.asarray(b).astype(np.float32)
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max())


@pytest.mark.parametrize("shape", [(5, 128), (3, 200), (2, 3, 77), (1, 1024)])
@pytest.mark.parametrize("mode,fill", [("soft", 0.0), ("hard", -jnp.inf), ("hard", -2.5)])
def test_kernel_equals_reference_on_odd_shapes(shape, mode, fill):
    x = _rows(sum(shape), shape)
    out = st.statistical_topk_pallas(x, k_frac=0.08, mode=mode, fill=fill, interpret=True, poison=True)
    ref = _jit(st.statistical_topk_reference, x, k_frac=0.08, mode=mode, fill=fill)
    assert out.shape == x.shape and out.dtype == x.dtype
    out, ref = np.asarray(out), np.asarray(ref)
    kept, kept_ref = out != fill, ref != fill
    np.testing.assert_array_equal(kept, kept_ref)
    assert 0 < int(kept.sum()) < x.size // 4
    _assert_close(np.where(kept, out, 0), np.where(kept_ref, ref, 0), jnp.float32)


@pytest.mark.parametrize("rows_per_block", [2, 4])
def test_row_blocks_that_do_not_divide_the_rows(rows_per_block):
    x = _rows(11, (7, 96))
    out = st.statistical_topk_pallas(x, k=9, rows_per_block=rows_per_block, interpret=True, poison=True)
    _assert_close(out, _jit(st.statistical_topk_reference, x, k=9), jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_rows(dtype):
    x = _rows(4, (6, 256), dtype)
    out = st.statistical_topk_pallas(x, k_frac=0.1, interpret=True, poison=True)
    assert out.dtype == dtype and np.isfinite(np.asarray(out).astype(np.float32)).all()
    _assert_close(out, _jit(st.statistical_topk_reference, x, k_frac=0.1), dtype)


def test_constant_rows_keep_nothing():
    x = jnp.asarray(np.concatenate([np.full((1, 64), 0.1, np.float32),
                                    np.full((1, 64), -7.0, np.float32), _np_rows(2, (1, 64))]))
    for mode in ("soft", "hard"):
        out = np.asarray(st.statistical_topk_pallas(x, k=4, mode=mode, interpret=True, poison=True))
        assert not out[:2].any() and out[2].any()


@pytest.mark.parametrize("stop", [False, True])
def test_gradient_is_the_references(stop):
    x = _rows(8, (4, 96))
    w = _normal(9, x.shape)

    def loss(f, v):
        return jnp.sum(w * f(v, k=9, stop_gradient_threshold=stop) ** 2)

    g = jax.jit(jax.grad(lambda v: loss(
        lambda *a, **kw: st.statistical_topk_pallas(*a, interpret=True, **kw), v)))(x)
    g_ref = jax.jit(jax.grad(lambda v: loss(topk.statistical_topk, v)))(x)
    assert float(np.abs(np.asarray(g)).max()) > 0
    _assert_close(g, g_ref, jnp.float32)


def test_jit_and_vmap():
    x = _rows(12, (3, 4, 128))
    f = jax.jit(jax.vmap(lambda v: st.statistical_topk_pallas(v, k_frac=0.1, interpret=True)))
    _assert_close(f(x), _jit(st.statistical_topk_reference, x, k_frac=0.1), jnp.float32)


def test_statistical_topk_impl_pallas_on_any_axis():
    x = _rows(13, (3, 100, 5))
    ref = _jit(topk.statistical_topk, x, k=10, axis=1)
    out = st.statistical_topk(x, k=10, axis=1, impl="pallas")
    _assert_close(out, ref, jnp.float32)
    # "auto" takes the kernel on GPU only; on CPU it is XLA's answer exactly (both jitted)
    if jax.default_backend() != "gpu":
        np.testing.assert_array_equal(np.asarray(_jit(st.statistical_topk, x, k=10, axis=1, impl="auto")),
                                      np.asarray(ref))


@pytest.mark.parametrize("kwargs,rule", [
    (dict(k=3, mode="mask"), "mode 'mask'"),
    (dict(k=3, where=np.ones((2, 16), bool)), "where= mask"),
    (dict(k=jnp.asarray(3)), "traced k"),
])
def test_what_the_kernel_does_not_take_is_named(kwargs, rule):
    x = _rows(1, (2, 16))
    with pytest.raises(ValueError, match=rule):
        st.statistical_topk(x, impl="pallas", **kwargs)
    _jit(st.statistical_topk, x, impl="auto", **kwargs)    # falls back to XLA instead
    with pytest.raises(ValueError, match="impl must be one of"):
        st.statistical_topk(x, k=3, impl="triton")


def test_rows_longer_than_a_program_holds_are_refused():
    x = jnp.ones((1, st.MAX_ROW + 1))
    with pytest.raises(ValueError, match=f"holds up to {st.MAX_ROW}"):
        st.statistical_topk_pallas(x, k=3, interpret=True)


# Rows that are not a power of two but have a power-of-two factor >= MIN_CHUNK are read in
# chunks (no padded copy): a gated FFN's d_ff. 320 = 64 * 5, 1536 = 512 * 3, 9216 = 1024 * 9.
@pytest.mark.parametrize("shape", [(3, 320), (2, 2, 1536), (1, 9216)])
@pytest.mark.parametrize("mode,fill", [("soft", 0.0), ("hard", -2.5)])
@pytest.mark.parametrize("programs_per_row", [None, 1, 2])
def test_rows_read_in_chunks_equal_the_reference(shape, mode, fill, programs_per_row):
    assert st.row_chunk(shape[-1]) is not None
    x = _rows(sum(shape) + 3, shape)
    out = st.statistical_topk_pallas(x, k_frac=0.08, mode=mode, fill=fill, interpret=True, poison=True,
                                     programs_per_row=programs_per_row)
    ref = _jit(st.statistical_topk_reference, x, k_frac=0.08, mode=mode, fill=fill)
    out, ref = np.asarray(out), np.asarray(ref)
    kept, kept_ref = out != fill, ref != fill
    np.testing.assert_array_equal(kept, kept_ref)
    assert 0 < int(kept.sum()) < x.size // 4
    _assert_close(np.where(kept, out, 0), np.where(kept_ref, ref, 0), jnp.float32)


def test_which_rows_are_read_in_chunks():
    assert [st.row_chunk(d) for d in (13824, 9216, 320, 200, 77, 1024, 4096)] == \
        [512, 1024, 64, None, None, None, None]


def test_chunked_rows_in_bf16_and_constant_rows():
    x = _np_rows(21, (3, 448), jnp.bfloat16)                     # 448 = 64 * 7
    x[0], x[1] = 0.3, -5.0
    x = jnp.asarray(x)
    out = st.statistical_topk_pallas(x, k=20, interpret=True, poison=True)
    assert out.dtype == jnp.bfloat16
    assert not np.asarray(out[:2]).any() and np.asarray(out[2]).any()
    _assert_close(out, _jit(st.statistical_topk_reference, x, k=20), jnp.bfloat16)


@pytest.mark.parametrize("width", [256, 320, 100])              # power of two, chunked, padded
def test_activation_on_the_kept_entries(width):
    x = _rows(width, (4, width))
    out = st.statistical_topk_pallas(x, k_frac=0.1, activation=jax.nn.gelu, interpret=True, poison=True)

    @jax.jit
    def references(x):
        soft = topk.statistical_topk(x, k_frac=0.1, axis=-1)
        return (soft, jnp.where(soft > 0, jax.nn.gelu(soft), 0.0),
                st.statistical_topk_reference(x, k_frac=0.1, activation=jax.nn.gelu))

    soft, ref, ref_act = references(x)
    np.testing.assert_array_equal(np.asarray(out) != 0, np.asarray(soft) > 0)
    _assert_close(out, ref, jnp.float32)
    _assert_close(out, ref_act, jnp.float32)


def test_activation_gradient_is_the_references():
    x = _rows(30, (3, 320))
    w = _normal(31, x.shape)
    g = jax.jit(jax.grad(lambda v: jnp.sum(w * st.statistical_topk_pallas(
        v, k=24, activation=jax.nn.silu, interpret=True))))(x)
    g_ref = jax.jit(jax.grad(lambda v: jnp.sum(
        w * st.statistical_topk_reference(v, k=24, activation=jax.nn.silu))))(x)
    assert float(np.abs(np.asarray(g)).max()) > 0
    _assert_close(g, g_ref, jnp.float32)


def test_activation_outside_soft_mode_is_refused():
    with pytest.raises(ValueError, match="activation outside plain soft mode"):
        st.statistical_topk_pallas(_rows(1, (2, 64)), k=3, mode="hard", activation=jax.nn.gelu,
                                   interpret=True)


def _masked_scores(seed, rows, width, dtype=jnp.float32):
    """Attention-like rows masked with the dtype's minimum: causal prefixes of every length,
    a row with no valid entry, rows with fewer valid entries than k."""
    x = _np_rows(seed, (rows, width), dtype)
    lengths = np.concatenate([np.array([0, 1, 5, width]),
                              np.random.default_rng(seed + 1).integers(6, width, rows - 4)])
    valid = np.arange(width)[None, :] < lengths[:, None]
    return jnp.asarray(np.where(valid, x, jnp.finfo(dtype).min).astype(dtype)), jnp.asarray(valid)


@pytest.mark.parametrize("width", [77, 256, 1000])
@pytest.mark.parametrize("count", [dict(k=8), dict(k_frac=0.1)])
@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_valid_above_equals_the_reference_with_where(width, count, mode):
    x, valid = _masked_scores(width, 12, width)
    fill = float(jnp.finfo(x.dtype).min) if mode == "hard" else 0.0
    bound = float(jnp.finfo(x.dtype).min) / 2
    out = st.statistical_topk_pallas(x, **count, mode=mode, fill=fill, valid_above=bound,
                                     interpret=True, poison=True)
    ref = np.asarray(jax.jit(lambda x, valid: topk.statistical_topk(
        x, **count, mode=mode, fill=fill, where=valid))(x, valid))
    out = np.asarray(out)
    kept, kept_ref = out != fill, ref != fill
    np.testing.assert_array_equal(kept, kept_ref)
    assert not kept[~np.asarray(valid)].any()                # masked scores are never kept
    if "k" in count:    # rows with at most k valid scores keep them all; the rest keep some
        np.testing.assert_array_equal(kept[1:3], np.asarray(valid[1:3]))
        assert 0 < kept[4:].sum() < np.asarray(valid[4:]).sum()
    # (soft form of a row that keeps every valid score: theta is -inf in both, so x - theta is)
    finite = np.isfinite(np.asarray(ref))
    np.testing.assert_array_equal(np.isfinite(np.asarray(out)), finite)
    _assert_close(np.where(kept & finite, out, 0), np.where(kept_ref & finite, ref, 0), jnp.float32)
    # the dispatcher takes the kernel for valid_above, and XLA's where= twin otherwise
    via = _jit(st.statistical_topk, x, **count, mode=mode, fill=fill, valid_above=bound, impl="pallas")
    np.testing.assert_array_equal(np.asarray(via) != fill, kept_ref)
    xla = _jit(st.statistical_topk, x, **count, mode=mode, fill=fill, valid_above=bound, impl="xla")
    np.testing.assert_array_equal(np.asarray(xla) != fill, kept_ref)


def test_valid_above_in_bf16_and_its_gradient():
    x, valid = _masked_scores(5, 8, 300, jnp.bfloat16)
    bound = float(jnp.finfo(jnp.bfloat16).min) / 2
    fill = float(jnp.finfo(jnp.bfloat16).min)
    out = st.statistical_topk_pallas(x, k=16, mode="hard", fill=fill, valid_above=bound, interpret=True)
    ref = jax.jit(lambda x, valid: topk.statistical_topk(x, k=16, mode="hard", fill=fill,
                                                         where=valid))(x, valid)
    np.testing.assert_array_equal(np.asarray(out) != fill, np.asarray(ref) != fill)
    xf, _ = _masked_scores(6, 8, 300)
    g = _normal(9, xf.shape)
    loss = lambda f: lambda v: jnp.sum(jnp.where(valid, f(v), 0.0) * g)
    got = jax.jit(jax.grad(loss(lambda v: st.statistical_topk_pallas(
        v, k=16, mode="soft", valid_above=-1e30, interpret=True))))(xf)
    want = jax.jit(jax.grad(loss(lambda v: topk.statistical_topk(
        v, k=16, mode="soft", where=v > -1e30))))(xf)
    _assert_close(got, want, jnp.float32)


def test_valid_above_and_where_together_are_refused():
    x = _rows(1, (2, 64))
    with pytest.raises(ValueError, match="where= or valid_above="):
        st.statistical_topk(x, k=4, where=x > 0, valid_above=0.0)


def test_the_kernels_quantile_matches_the_references():
    # In the kernel k / count varies per row, so the quantile is computed there, from
    # operations a kernel lowers; it must be the reference's own to float32 rounding.
    frac = jnp.asarray(np.concatenate([np.logspace(-9, -1e-4, 400), np.linspace(1e-3, 0.999, 400),
                                       1 - np.logspace(-7, -1, 100)]).astype(np.float32))
    got, want = np.asarray(_jit(st.upper_quantile, frac)), np.asarray(_jit(topk._upper_quantile, frac))
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)
