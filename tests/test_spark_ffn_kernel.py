"""Top-k gated FFN decode: selection, XLA and Pallas (interpret mode) paths vs the reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.kernels import spark_ffn as sf

from kernel_testing import assert_written, jit_call, normal, rel_error

# small tiles and few programs: interpret mode runs every program in Python
TILING = dict(bc=16, bk=64, bn=64, up_programs=2, splits=2)


# Inputs drawn by numpy; the layers and references run jitted (jit_call): one program each,
# where op by op every operation at every new shape was a program to compile.
def _weights(seed, d=70, d_ff=203, r=30, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    wi = jnp.asarray((rng.standard_normal((d, d_ff)) / d ** 0.5).astype(np.float32).astype(dtype))
    wo = jnp.asarray((rng.standard_normal((d_ff, d)) / d_ff ** 0.5).astype(np.float32).astype(dtype))
    return wi, wo, jit_call(sf.decode_weights_from_spark, wi, wo, predictor_dims=r)


def _x(seed, batch, d=70, dtype=jnp.float32):
    return jnp.asarray(np.asarray(normal(1000 + seed, (batch, d))).astype(dtype))


def test_select_neurons_lists_the_union_in_order():
    pre = normal(3, (5, 301))
    act, idx, count = jit_call(sf.select_neurons, pre, k_frac=0.1, capacity=301)
    fired = (np.asarray(act) != 0).any(0)
    assert int(count) == fired.sum() > 0
    np.testing.assert_array_equal(np.asarray(idx[:int(count)]), np.nonzero(fired)[0])
    # a short list still reports the true count (overflow)
    _, idx_s, count_s = jit_call(sf.select_neurons, pre, k_frac=0.1, capacity=8)
    assert int(count_s) == int(count) > 8
    np.testing.assert_array_equal(np.asarray(idx_s), np.nonzero(fired)[0][:8])


@pytest.mark.parametrize("batch,capacity,impl", [
    (1, 203, "pallas"), (3, 12, "pallas"), (8, 203, "pallas"),   # 12 < union: the dense fallback
    (1, 12, "xla"), (3, 203, "xla"), (8, 12, "xla"),
])
def test_decode_equals_reference_including_overflow(batch, capacity, impl):
    _, _, w = _weights(batch)
    x = _x(batch + capacity, batch)
    ref = jit_call(sf.topk_ffn_decode_reference, x, w, k_frac=0.08)
    count = int(jax.jit(lambda x, w: sf.select_neurons(w.gate_input(x) @ w.w_gate, k_frac=0.08,
                                                       capacity=capacity)[2])(x, w))
    assert (count > capacity) == (capacity == 12)
    kw = dict(interpret=True, poison=True, **TILING) if impl == "pallas" else {}
    y = jit_call(sf.topk_ffn_decode, x, w, k_frac=0.08, capacity=capacity, impl=impl, **kw)
    assert y.shape == x.shape
    assert_written(y)
    assert rel_error(y, ref) < 1e-5


def test_decode_is_sparse_not_dense():
    """The layer differs from the dense gated FFN: neurons outside the top-k are dropped."""
    _, _, w = _weights(11)
    x = _x(11, 2)

    @jax.jit
    def dense_ffn(x, w):
        pre = w.gate_input(x) @ w.w_gate
        return (jax.nn.gelu(pre) * (w.up_input(x) @ w.w_up_t.T)) @ w.w_down

    dense = dense_ffn(x, w)
    y = jit_call(sf.topk_ffn_decode, x, w, k_frac=0.08, capacity=203, impl="xla")
    assert rel_error(y, dense) > 0.1


def test_pallas_gathered_part_with_arbitrary_index_lists():
    """Kernel vs reference on the gathered part alone: random act, union, bf16 weights."""
    batch, d_up, d_ff, d_out = 4, 45, 150, 77
    rng = np.random.default_rng(5)
    bf16 = lambda *shape: jnp.asarray(rng.standard_normal(shape).astype(np.float32).astype(jnp.bfloat16))
    x_up, w_up_t, w_down = bf16(batch, d_up), bf16(d_ff, d_up), bf16(d_ff, d_out)
    live = rng.random((batch, d_ff)) < 0.2
    act = jnp.asarray(np.where(live, rng.standard_normal((batch, d_ff)), 0.0).astype(np.float32))
    fired = np.nonzero(live.any(0))[0]
    for capacity in (len(fired) + 5, len(fired) - 3):
        idx = np.zeros(capacity, np.int32)
        n = min(capacity, len(fired))
        idx[:n] = fired[:n]
        ref = jit_call(sf.gathered_ffn_reference, x_up, act, w_up_t, w_down)
        for impl, kw in (("pallas", dict(interpret=True, poison=True, **TILING)), ("xla", {})):
            y = jit_call(sf.gathered_ffn, x_up, act, w_up_t, w_down, jnp.asarray(idx),
                         jnp.int32(len(fired)), impl=impl, **kw)
            assert rel_error(y, ref) < 1e-2, (impl, capacity)


def test_plain_gated_layout_and_bf16():
    d, d_ff = 48, 130
    wg, wu = (normal(seed, (d, d_ff)) / d ** 0.5 for seed in (7, 8))
    wd = normal(9, (d_ff, d)) / d_ff ** 0.5
    w = jit_call(sf.decode_weights_from_gated, wg, wu, wd)
    wb = jax.tree.map(lambda a: jnp.asarray(np.asarray(a).astype(jnp.bfloat16)), w)
    x = _x(7, 2, d)
    ref = jit_call(sf.topk_ffn_decode_reference, x, w, k=10)
    y = jit_call(sf.topk_ffn_decode, jnp.asarray(np.asarray(x).astype(jnp.bfloat16)), wb, k=10,
                 capacity=64, impl="pallas", interpret=True, **TILING)
    assert y.dtype == jnp.bfloat16
    assert rel_error(y, ref) < 3e-2


def test_bad_arguments():
    wi, wo, w = _weights(9)
    with pytest.raises(ValueError, match="predictor_dims"):
        sf.decode_weights_from_spark(wi, wo, 70)
    # (traced, so the selection that runs before a late check is not compiled op by op)
    with pytest.raises(ValueError, match="capacity"):
        jit_call(sf.topk_ffn_decode, _x(9, 1), w, k_frac=0.08, capacity=0)
    with pytest.raises(ValueError, match="impl must be one of"):
        jit_call(sf.topk_ffn_decode, _x(9, 1), w, k_frac=0.08, capacity=20, impl="cuda")
    with pytest.raises(ValueError, match="batch <= 8"):
        jit_call(sf.topk_ffn_decode, _x(9, 9), w, k_frac=0.08, capacity=20, impl="pallas", interpret=True)
    with pytest.raises(ValueError, match="power of two"):
        jit_call(sf.topk_ffn_decode, _x(9, 1), w, k_frac=0.08, capacity=20, impl="pallas",
                 interpret=True, bc=6)
