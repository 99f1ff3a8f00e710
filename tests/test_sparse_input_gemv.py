"""Sparse-input GEMV (every path, Pallas in interpret mode) and the masked Spark FFN paths vs references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.kernels import spark_ffn as sf
from sparsejax.kernels import sparse_input_gemv as sg

from kernel_testing import assert_written, jit_call, normal, rel_error

TILES = dict(bk=16, bn=32, bc=8, splits=2)


def _sparse_x(seed, batch, k, zero_frac):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, k)).astype(np.float32)
    x[:, rng.random(k) < zero_frac] = 0.0            # whole rows dead for every token
    return jnp.asarray(x)


@pytest.mark.parametrize("impl,batch,k,n,mma", [
    ("masked", 1, 100, 70, False), ("masked", 3, 48, 130, True), ("gather", 5, 40, 33, False),
    ("gather", 2, 48, 33, True), ("xla_compact", 3, 96, 130, None), ("xla_dense", 1, 100, 70, None)])
def test_every_path_equals_the_reference_with_threshold(impl, batch, k, n, mma):
    x = _sparse_x(batch + k, batch, k, 0.6)
    w = normal(n, (k, n))
    ref = jit_call(sg.sparse_input_gemv_reference, x, w, threshold=0.3)
    y = jit_call(sg.sparse_input_gemv, x, w, threshold=0.3, impl=impl, interpret=True, mma=mma, **TILES)
    assert y.shape == (batch, n)
    assert_written(y)
    assert rel_error(y, ref) < 1e-5
    # the threshold really drops inputs: without it the answer differs
    assert rel_error(jit_call(sg.sparse_input_gemv_reference, x, w), ref) > 1e-3


@pytest.mark.parametrize("batch,k,mma,steps,partials,unroll", [
    (1, 128, False, 4, False, None), (3, 96, False, 2, True, False), (2, 64, True, 4, True, True),
    (1, 48, False, 8, True, None)])
def test_masked_split_steps_and_partials_equal_the_reference(batch, k, mma, steps, partials, unroll):
    x = _sparse_x(7 * batch + k, batch, k, 0.7)
    w = normal(k, (k, 70))
    ref = jit_call(sg.sparse_input_gemv_reference, x, w, threshold=0.2)
    y = jit_call(sg.sparse_input_gemv, x, w, threshold=0.2, impl="masked", interpret=True, poison=True,
                 mma=mma, bk=16, bn=32, steps=steps, partials=partials, unroll=unroll)
    assert y.shape == (batch, 70)
    assert_written(y)
    assert rel_error(y, ref) < 1e-5


@pytest.mark.parametrize("batch,k,n,threshold,knobs", [
    (1, 100, 70, 0.0, dict(span=32, bc=8, col_splits=2)),                     # 4 ranges, x padded
    (3, 300, 130, 0.3, dict(span=64, bc=16, col_splits=3, programs=2)),       # 3 ranges per group
    (8, 72, 33, 0.2, dict(span=16, bc=4, col_splits=1, partials=False)),      # atomics path
    (3, 150, 130, 0.3, dict(compact="xla", bc=16, col_splits=2, programs=3)),
    (1, 150, 40, 0.0, dict(compact="xla", bc=8, col_splits=2, programs=2, partials=False)),
    (3, 300, 130, 0.3, dict(span=64, bc=16, col_splits=3, programs=3, sum_in_kernel=True)),
    (2, 150, 40, 0.0, dict(compact="xla", bc=8, col_splits=2, programs=3, sum_in_kernel=True))])
def test_rows_equals_the_reference(batch, k, n, threshold, knobs):
    x = _sparse_x(11 * batch + k, batch, k, 0.6)
    w = normal(k + n, (k, n))
    ref = jit_call(sg.sparse_input_gemv_reference, x, w, threshold=threshold)
    y = jit_call(sg.sparse_input_gemv, x, w, threshold=threshold, impl="rows", interpret=True,
                 poison=True, **knobs)
    assert y.shape == (batch, n)
    assert_written(y)
    assert rel_error(y, ref) < 1e-5


@pytest.mark.parametrize("compact", ["kernel", "xla"])
def test_rows_all_dead_is_zero_and_all_live_is_the_dense_product(compact):
    knobs = dict(impl="rows", interpret=True, poison=True, compact=compact, span=32, bc=8,
                 col_splits=2, programs=2)
    rng = np.random.default_rng(5)
    w = jnp.asarray(rng.standard_normal((90, 50)), jnp.float32)
    x = jnp.asarray(rng.uniform(0.5, 1.5, (3, 90)) * rng.choice([-1.0, 1.0], (3, 90)), jnp.float32)
    dead = jit_call(sg.sparse_input_gemv, x, w, threshold=2.0, **knobs)   # every |x| <= 1.5: no live row
    np.testing.assert_array_equal(np.asarray(dead), 0.0)
    y = jit_call(sg.sparse_input_gemv, x, w, **knobs)              # no input is zero: every row live
    assert_written(y)
    assert rel_error(y, jit_call(sg.sparse_input_gemv_reference, x, w)) < 1e-5
    assert rel_error(y, np.asarray(x) @ np.asarray(w)) < 1e-5



@pytest.mark.parametrize("impl", ["rows", "masked"])
def test_bf16_inputs_at_the_rounded_threshold_count_as_dead(impl):
    # bf16(0.3) = 0.30078125: the reference compares in bf16, so an input of exactly that
    # size is dead; a float32 compare against 0.3 would keep it.
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 96)).astype(np.float32)
    x[:, ::3] = 0.30078125 * np.sign(x[:, ::3])
    x = jnp.asarray(x.astype(jnp.bfloat16))
    w = jnp.asarray(rng.standard_normal((96, 40)).astype(jnp.bfloat16))
    ref = jit_call(sg.sparse_input_gemv_reference, x, w, threshold=0.3, out_dtype=jnp.float32)
    y = jit_call(sg.sparse_input_gemv, x, w, threshold=0.3, impl=impl, interpret=True, bk=16, bn=32,
                 span=32, bc=8, col_splits=2, out_dtype=jnp.float32)
    assert rel_error(y, ref) < 1e-5

def test_rows_layout_covers_every_row_and_column():
    lay = sg.rows_layout(8192, 8192, span=256, programs=None, col_splits=16)
    assert (lay["bn"], lay["strips"], lay["programs"], lay["ranges_per_program"]) == (512, 16, 32, 1)
    lay = sg.rows_layout(13824, 2304, span=256, programs=20, col_splits=8)
    assert lay["bn"] == 256 and lay["strips"] == 9                # divides N: W is never padded
    assert sg.rows_layout(64, 100, col_splits=2)["bn"] == 64      # nothing divides 100: pad once
    assert lay["programs"] * lay["ranges_per_program"] >= lay["n_ranges"] == 54
    assert (lay["programs"] - 1) * lay["ranges_per_program"] < 54           # no group left idle

def test_compact_list_overflow_falls_back_to_dense():
    x = _sparse_x(0, 2, 64, 0.2)
    w = normal(1, (64, 24))
    live = sg.live_rows(x)
    idx, count = sg.live_row_list(live, 8)
    assert int(count) == int(live.sum()) > 8
    np.testing.assert_array_equal(np.asarray(idx), np.nonzero(np.asarray(live))[0][:8])
    y = sg.sparse_input_gemv(x, w, impl="xla_compact", capacity=8)
    assert rel_error(y, sg.sparse_input_gemv_reference(x, w)) < 1e-5


def test_bad_arguments_raise_one_line_errors():
    x, w = jnp.ones((2, 8)), jnp.ones((8, 4))
    with pytest.raises(ValueError, match="impl must be one of"):
        sg.sparse_input_gemv(x, w, impl="bogus")
    with pytest.raises(ValueError, match="same K"):
        sg.sparse_input_gemv(jnp.ones((2, 7)), w)
    with pytest.raises(ValueError, match="cannot run here"):
        sg.sparse_input_gemv(jnp.ones((9, 8)), w, impl="masked", interpret=True)
    with pytest.raises(ValueError, match="capacity"):
        sg.sparse_input_gemv(x, w, impl="xla_compact", capacity=0)
    with pytest.raises(ValueError, match="span must be a power of two"):
        sg.sparse_input_gemv(x, w, impl="rows", interpret=True, span=48)
    with pytest.raises(ValueError, match="col_splits must be a positive int"):
        sg.sparse_input_gemv(x, w, impl="rows", interpret=True, col_splits=0)
    with pytest.raises(ValueError, match="sum_in_kernel=True .* needs partials=True"):
        sg.sparse_input_gemv(x, w, impl="rows", interpret=True, partials=False, sum_in_kernel=True)
    with pytest.raises(ValueError, match="compact must be one of"):
        sg.sparse_input_gemv(x, w, impl="rows", interpret=True, compact="host")


def _spark_weights(seed, d, d_ff, r):
    wi = normal(2 * seed, (d, d_ff)) / d ** 0.5
    wo = normal(2 * seed + 1, (d_ff, d)) / d_ff ** 0.5
    return jit_call(sf.decode_weights_from_spark, wi, wo, predictor_dims=r)


@pytest.mark.parametrize("impl,batch,extra", [("fused", 1, dict(unroll=False)), ("sparse", 3, {}),
                                               ("fused", 2, dict(partials=True, act_in_kernel=True)),
                                               ("sparse", 3, dict(act_in_kernel=True, down_tiles=dict(
                                                   impl="rows", bc=8, span=32, col_splits=2))),
                                               ("sparse", 2, dict(
                                                   gate_tiles=dict(bk=8, bn=32, steps=2, partials=True),
                                                   down_tiles=dict(bk=16, bn=32, steps=4, partials=True))),
                                               ("sparse", 3, dict(down_tiles=dict(
                                                   impl="rows", bc=8, span=32, col_splits=2))),
                                               ("sparse", 1, dict(gate_pad2=True, down_tiles=dict(
                                                   impl="rows", bc=8, span=32, col_splits=2))),
                                               ("fused", 1, dict(gate_pad2=True)),
                                               ("sparse", 1, dict(gate_pad2=True, down_tiles=dict(
                                                   impl="rows", bc=8, span=32, col_splits=2,
                                                   sum_in_kernel=True))),
                                               # the tensor-core kernels: several tokens as one operand
                                               ("sparse", 2, dict(mma=True)),
                                               ("sparse", 5, dict(mma=True, act_in_kernel=True)),
                                               ("sparse", 8, dict(mma=True, select_kernel=True)),
                                               ("sparse", 6, dict(mma=True, select_kernel=True,
                                                                  pad_batch=True)),
                                               ("sparse", 3, dict(mma=True, down_tiles=dict(
                                                   mma=False, bk=16, bn=32)))])
def test_masked_spark_ffn_equals_reference(impl, batch, extra):
    d, d_ff, r = 40, 99, 16
    w = _spark_weights(batch, d, d_ff, r)
    x = normal(100 + batch, (batch, d))
    ref = jit_call(sf.topk_ffn_decode_reference, x, w, k_frac=0.08)
    extra = dict(extra, poison=True)
    y = jit_call(sf.topk_ffn_decode, x, w, k_frac=0.08, impl=impl, interpret=True, bj=16, bk=32, bn=32,
                 **extra)
    assert y.shape == x.shape
    assert_written(y)
    assert rel_error(y, ref) < 1e-5


def test_padding_the_tokens_once_leaves_one_pad_of_activations():
    d, d_ff, r = 40, 99, 16
    w = _spark_weights(7, d, d_ff, r)
    x = normal(8, (5, d))

    def pads(pad_batch):
        fn = lambda x: sf.topk_ffn_decode(x, w, k_frac=0.08, impl="sparse", interpret=True, bj=16, bk=32,
                                          bn=32, mma=True, select_kernel=True, pad_batch=pad_batch)
        eqns = jax.make_jaxpr(fn)(x).jaxpr.eqns
        # pads that add rows to the tokens or the selection (5 -> 16; the weights' pads to the
        # tiles and the column pads are the same in both, and none at the decode shapes)
        return sum((e.primitive.name == "pad" or "pad" in str(e.params.get("name", "")))
                   and e.invars[0].aval.shape[0] == 5
                   and e.outvars[0].aval.shape[0] == 16 for e in eqns)

    assert (pads(False), pads(True)) == (2, 1)


def test_masked_spark_ffn_mma_refuses_what_it_cannot_run():
    x, act = jnp.ones((2, 32)), jnp.ones((2, 64))
    w_up_t, w_down = jnp.ones((64, 32)), jnp.ones((64, 32))
    with pytest.raises(ValueError, match="mma=True needs fused=False"):
        sf.masked_ffn(x, act, w_up_t, w_down, fused=True, mma=True, interpret=True)
    with pytest.raises(ValueError, match="bj, bk >= 16"):
        sf.masked_ffn(x, act, w_up_t, w_down, fused=False, mma=True, bj=8, interpret=True)


@pytest.mark.parametrize("d_ff,batch", [(99, 1), (192, 1), (192, 3)])      # padded row, chunked row
def test_select_kernel_spark_ffn_equals_reference(d_ff, batch):
    d, r = 40, 16
    w = _spark_weights(d_ff + batch, d, d_ff, r)
    x = normal(200 + batch, (batch, d))
    ref = jit_call(sf.topk_ffn_decode_reference, x, w, k_frac=0.08)
    name, tiling = sf.CHOICE_PATHS["sparse_rows_down_pad2_gate_select"]
    tiling = dict(tiling, down_tiles=dict(impl="rows", bc=8, span=32, col_splits=2))

    def run(x):
        return sf.topk_ffn_decode(x, w, k_frac=0.08, impl=name, interpret=True, bj=16, bk=32, bn=32,
                                  poison=True, **tiling)

    y = jax.jit(run)(x)
    assert y.shape == x.shape
    assert_written(y)
    assert rel_error(y, ref) < 1e-5
    # The threshold is the kernel's: no square root (the standard deviation) left to XLA.
    eqns = jax.make_jaxpr(run)(x).jaxpr.eqns
    assert "sqrt" not in {e.primitive.name for e in eqns}
    if batch == 1 and d_ff == 192:
        # A chunked row at batch 1 takes the padded-row product as it is: no copy of its first row.
        gate = next(e for e in eqns if e.primitive.name == "dot_general" and e.invars[1].aval.shape == (r, d_ff))
        readers = [e.primitive.name for e in eqns if any(v is gate.outvars[0] for v in e.invars)]
        assert any(name.startswith("custom_vjp") for name in readers), readers


def test_padded_row_predictor_runs_a_two_row_product_at_batch_one_only():
    d, d_ff, r = 40, 99, 16
    w = _spark_weights(5, d, d_ff, r)

    def gate_rows(batch):
        x = normal(6, (batch, d))
        jaxpr = jax.make_jaxpr(lambda x: sf.topk_ffn_decode(
            x, w, k_frac=0.08, impl="sparse", interpret=True, bj=16, bk=32, bn=32, gate_pad2=True))(x)
        return [e.invars[0].aval.shape[0] for e in jaxpr.jaxpr.eqns
                if e.primitive.name == "dot_general" and e.invars[1].aval.shape == (r, d_ff)]

    assert gate_rows(1) == [2] and gate_rows(3) == [3]


def test_choose_impl_is_deterministic_dense_on_cpu():
    w = sf.decode_weights_from_gated(jnp.ones((8, 16)), jnp.ones((8, 16)), jnp.ones((16, 8)))
    choice = sf.choose_impl(2, w, k_frac=0.25)
    assert choice.name == "dense" and choice.source == "default"


def test_auto_layer_runs_the_chosen_path_and_matches_the_reference():
    w = jit_call(sf.decode_weights_from_gated, normal(11, (24, 64)) / 5, normal(12, (24, 64)) / 5,
                 normal(13, (64, 24)) / 8)
    x = normal(14, (2, 24))
    ref = jit_call(sf.topk_ffn_decode_reference, x, w, k_frac=0.25)
    y = jax.jit(lambda x, w: sf.topk_ffn_decode(x, w, k_frac=0.25, impl="auto"))(x, w)
    assert rel_error(y, ref) < 1e-5


@pytest.mark.parametrize("name", sorted(sf.CHOICE_PATHS))
def test_every_choice_path_equals_the_reference(name):
    # What choose_impl may pick, with its own tilings (the tensor-core paths at several tokens).
    impl, tiling = sf.CHOICE_PATHS[name]
    batch = 3 if tiling.get("mma") else 1
    d, d_ff, r = 40, 99, 16
    w = _spark_weights(11, d, d_ff, r)
    x = normal(12, (batch, d))
    y = jit_call(sf.topk_ffn_decode, x, w, k_frac=0.08, impl=impl, interpret=True, bj=16, bk=32, bn=32,
                 **tiling)
    assert y.shape == x.shape
    assert rel_error(y, jit_call(sf.topk_ffn_decode_reference, x, w, k_frac=0.08)) < 1e-5
