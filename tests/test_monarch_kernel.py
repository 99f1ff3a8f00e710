"""Monarch multiply paths against the plain-JAX reference: the fused Mosaic GPU kernel (in
interpret mode on CPU), the einsum path with its compute-dtype backward, and the core operands."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import monarch
from sparsejax.kernels import monarch_matmul as mk

from kernel_testing import assert_matches_reference, normal


# The factors' init, and each product with its gradients, run jitted: one program each, where
# op by op every operation at every new shape was a program to compile.
def _problem(seed, t, k, n, nb, dtype):
    f = jax.jit(lambda key: monarch.init_factors(key, k, n, nb, dtype))(jax.random.PRNGKey(seed))
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((t, k)).astype(np.float32).astype(dtype))
    ct = jnp.asarray(rng.standard_normal((t, n)).astype(np.float32).astype(dtype))
    return x, f, ct


def _value_and_grads(fn, x, f, ct):
    def run(x, f, ct):
        y, vjp = jax.vjp(fn, x, f)
        return y, vjp(ct)
    return jax.jit(run)(x, f, ct)


def test_fused_kernel_in_interpret_mode_matches_reference():
    # K = 76, N = 72, nblocks = 2: p = 38, s = 36, q = 36, so each output block reads 18
    # intermediate columns from each input block, padded to 32 (two chunks of 16); 38 and 36
    # are no multiple of the tiles (zero padding), stage one takes three contraction steps
    # and stage two three output tiles, each one pipeline step of 64 rows of w2 (the four
    # chunks of a block folded, one wgmma each); one program computes both output blocks
    # (group 2: stage one's accumulator spans both blocks' slices). The forward under grad also writes
    # h for the backward. Interpret mode reads uninitialised memory as NaN: an output (or a
    # saved h) the kernel misses fails the finiteness checks.
    x, f, ct = _problem(1, 21, 76, 72, 2, jnp.bfloat16)
    assert mk.supported(x.shape, f, interpret=True) is None
    tiles = mk.MonarchTiles(rows=64, step_in=16, chunk=16, out_cols=16, stages=2, group=2)
    kernel = lambda x, f: mk.monarch_matmul(x, f, 72, impl="kernel", interpret=True, tiles=tiles,
                                             backward="fused")
    y, (gx, gf) = _value_and_grads(kernel, x, f, ct)
    ry, (rx, rf) = _value_and_grads(lambda x, f: mk.monarch_matmul_reference(x, f, 72), x, f, ct)
    assert y.shape == (21, 72) and y.dtype == jnp.bfloat16
    # Same products, f32 accumulation, h rounded to bf16 in both: only summation order differs.
    assert_matches_reference(y, ry, 1e-2)
    assert_matches_reference(gx, rx, 1e-2)          # dx through the kernel on the transposed operands
    assert_matches_reference(gf["w1"], rf["w1"], 1e-2)
    assert_matches_reference(gf["w2"], rf["w2"], 1e-2)


@pytest.mark.parametrize("t,k,n,nb", [(13, 27, 43, 2), (9, 47, 100, 3)])
def test_einsum_path_matches_reference_forward_and_backward(t, k, n, nb):
    # On CPU both roundings take the same (exact f32) branch, so one spelling per dtype.
    # block_runs (w1's rows reordered so P1 moves contiguous runs) applies when nb | q
    # (q = 14, nb = 2 here; q = 16, nb = 3 takes the fly order either way).
    for dtype, tol, native, runs in ((jnp.float32, 1e-6, False, True), (jnp.float32, 1e-6, False, False),
                                     (jnp.bfloat16, 1e-2, True, True)):
        x, f, ct = _problem(t + k + n, t, k, n, nb, dtype)
        einsum = lambda x, f: mk.monarch_matmul_einsum(x, f, n, native_rounding=native,
                                                       block_runs=runs)
        y, (gx, gf) = _value_and_grads(einsum, x, f, ct)
        ry, (rx, rf) = _value_and_grads(lambda x, f: monarch.matmul_reference(x, f, n), x, f, ct)
        assert y.dtype == dtype and gx.dtype == dtype and gf["w1"].dtype == dtype
        for got, want in ((y, ry), (gx, rx), (gf["w1"], rf["w1"]), (gf["w2"], rf["w2"])):
            assert_matches_reference(got, want, tol)


def test_einsum_path_keeps_leading_axes_and_jits():
    x, f, _ = _problem(4, 6, 24, 36, 3, jnp.float32)
    x3 = x.reshape(2, 3, 24)
    y = jax.jit(lambda x, f: mk.monarch_matmul_einsum(x, f, 30))(x3, f)
    assert y.shape == (2, 3, 30)
    assert_matches_reference(y, jax.jit(lambda x, f: monarch.matmul_reference(x, f, 30))(x3, f), 1e-6)


def _activation_transposes(jaxpr, tokens):
    """Transposes, in ``jaxpr`` and its sub-jaxprs, of arrays with at least ``tokens * 16``
    elements (activations here; the factors are smaller)."""
    from sparsejax.compiler.interpreter import sub_jaxprs
    found = []
    for e in jaxpr.eqns:
        for _, sub in sub_jaxprs(e):
            found += _activation_transposes(sub, tokens)
        if e.primitive.name == "transpose" and np.prod(e.invars[0].aval.shape) >= tokens * 16:
            found.append((e.invars[0].aval.shape, e.params["permutation"]))
    return found


@pytest.mark.parametrize("k,n,runs", [(64, 256, False), (64, 256, True), (256, 64, True),
                                      (64, 256, None)])
def test_einsum_path_moves_each_activation_once(k, n, runs):
    # Each GEMM's product is used in the order the GEMM writes it (the block axis major) and
    # each GEMM reads its input blocks in place, so the activations that move are the two the
    # Monarch permutations move: forward the intermediate (P1) and the output (P2); backward
    # the output's cotangent, the intermediate's (P1 transposed) and dx back to token-major
    # order. Spelled as token-major einsums, every product was transposed after its GEMM too
    # (4 forward, 4 more backward). The values are checked against the reference too.
    t, nb = 512, 4
    x, f, ct = _problem(1, t, k, n, nb, jnp.bfloat16)
    fn = lambda x, f: mk.monarch_matmul_einsum(x, f, n, block_runs=runs)
    forward = _activation_transposes(jax.make_jaxpr(fn)(x, f).jaxpr, t)
    backward = _activation_transposes(
        jax.make_jaxpr(lambda x, f, ct: jax.vjp(fn, x, f)[1](ct))(x, f, ct).jaxpr, t)
    assert len(forward) == 2, forward
    assert len(backward) == 2 + 3, backward
    y, (gx, gf) = _value_and_grads(fn, x, f, ct)
    ry, (rx, rf) = _value_and_grads(lambda x, f: monarch.matmul_reference(x, f, n), x, f, ct)
    for got, want in ((y, ry), (gx, rx), (gf["w1"], rf["w1"]), (gf["w2"], rf["w2"])):
        assert_matches_reference(got, want, 1e-2)


@pytest.mark.parametrize("k,n,nb", [(16, 32, 4), (10, 13, 3)])
def test_core_operands_fold_the_permutation(k, n, nb):
    # core(u, a, b), read back through the output interleave, is the Monarch product, also
    # when nblocks does not divide q (zero-padded slots), and after padding the slot width.
    x, f, _ = _problem(k * n, 7, k, n, nb, jnp.float32)
    (_, q, p), (_, s, _) = monarch.monarch_shapes(k, n, nb)
    u = jnp.pad(x, ((0, 0), (0, nb * p - k))).reshape(7, nb, p)
    want = monarch.matmul_reference(x, f, n, precision=jax.lax.Precision.HIGHEST)
    for width in (None, mk._slot_plan(nb, q)[3] + 3):
        a, b = mk.core_operands(f["w1"], f["w2"], width)
        z = mk.core_reference(u, a, b)
        assert_matches_reference(z.transpose(0, 2, 1).reshape(7, nb * s)[:, :n], want, 1e-5)
    # The input gradient's core runs on the transposed operands.
    at, bt = mk._transposed_core_operands(a, b)
    g = normal(0, z.shape)
    dx = jax.vjp(lambda u: mk.core_reference(u, a, b), u)[1](g)[0]
    assert_matches_reference(mk.core_reference(g, at, bt), dx, 1e-5)


def test_supported_names_the_reason():
    f = {"w1": jax.ShapeDtypeStruct((4, 1024, 1024), jnp.bfloat16),
         "w2": jax.ShapeDtypeStruct((4, 4096, 1024), jnp.bfloat16)}
    assert mk.supported((8192, 4096), f, backend="gpu") is None
    assert "Mosaic GPU only" in mk.supported((8192, 4096), f, backend="cpu")
    assert "float32" in mk.supported((8192, 4096), f, jnp.float32, backend="gpu")
    # h_j of 64 x 4096 bf16 alone is 512 KB: over the shared memory a block may use.
    big = {"w1": jax.ShapeDtypeStruct((2, 4096, 4096), jnp.bfloat16),
           "w2": jax.ShapeDtypeStruct((2, 8192, 4096), jnp.bfloat16)}
    assert "shared memory" in mk.supported((8192, 8192), big, backend="gpu")
    # nblocks 64 at 4096 -> 16384: one intermediate column per block pair, padded to 16.
    thin = {"w1": jax.ShapeDtypeStruct((64, 64, 64), jnp.bfloat16),
            "w2": jax.ShapeDtypeStruct((64, 256, 64), jnp.bfloat16)}
    assert "einsums win" in mk.supported((8192, 4096), thin, backend="gpu")
    tiles = mk.MonarchTiles(rows=64, chunk=64, group=3)
    assert "does not divide" in mk.supported((8192, 4096), f, backend="gpu", tiles=tiles)
    tiles = mk.MonarchTiles(rows=128, chunk=128, group=2)
    assert "register budget" in mk.supported((8192, 4096), f, backend="gpu", tiles=tiles)
    # 3072 -> 768 at nblocks 4: s = 192 takes 64-column output tiles (128 would pad to 256).
    assert mk.choose_tiles(4, 192, 768, 192).out_cols == 64
    assert mk._fold(16, 16) == 4 and mk._fold(48, 4) == 1 and mk._fold(16, 6) == 3


def test_paths_off_gpu_and_bad_arguments():
    x, f, _ = _problem(3, 5, 16, 32, 2, jnp.float32)
    # Off GPU without interpret: the reference, exactly.
    np.testing.assert_array_equal(np.asarray(mk.monarch_matmul(x, f)),
                                  np.asarray(mk.monarch_matmul_reference(x, f)))
    with pytest.raises(ValueError, match="impl='kernel' cannot run: .*Mosaic GPU only"):
        mk.monarch_matmul(x, f, impl="kernel")
    with pytest.raises(ValueError, match="backward must be"):
        mk.monarch_matmul(x, f, backward="xla")
    with pytest.raises(ValueError, match="out_features must be in"):
        mk.monarch_matmul(x, f, 33)
    with pytest.raises(ValueError, match="at most 16"):
        mk.monarch_matmul(jnp.ones((2, 33)), f)


def _cuda_lowering(fn, *args):
    """The StableHLO module of ``fn`` exported for CUDA: Pallas lowers the Mosaic GPU kernels
    and runs Mosaic GPU's layout inference (what failed on the H200 for sub-64-column
    chunks) without a GPU. Interpret mode checks none of the layout rules."""
    try:
        return jax.export.export(jax.jit(fn), platforms=["cuda"])(*args).mlir_module()
    except Exception as e:  # noqa: BLE001 - only a missing CUDA lowering is a skip
        if "cuda" in str(e).lower() and "platform" in str(e).lower():
            pytest.skip(f"no CUDA lowering in this jaxlib: {e}")
        raise


# benchmarks/monarch_speed.py's SHAPES (tokens, K, N, nblocks): every one must lower.
_BENCHMARK_SHAPES = [(8192, 4096, 16384, 16), (8192, 16384, 4096, 16), (16384, 768, 3072, 4),
                     (16384, 3072, 768, 4), (8192, 4096, 16384, 4), (8192, 16384, 4096, 4)]


@pytest.mark.parametrize("tokens,k,n,nb", _BENCHMARK_SHAPES)
def test_kernel_forward_and_fused_dx_lower_for_cuda(tokens, k, n, nb):
    # The default tiles of each benchmark shape: the forward (which also writes h for the
    # backward) and dx through the kernel on the transposed operands; two Mosaic GPU kernels.
    (_, q, p), (_, s, _) = monarch.monarch_shapes(k, n, nb)
    bf16 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    f = {"w1": bf16(nb, q, p), "w2": bf16(nb, s, q)}
    assert mk.supported((tokens, k), f, backend="gpu") is None
    cfg = mk._Config(tiles=mk.choose_tiles(nb, q, p, s),
                     tiles_dx=mk.choose_tiles(nb, q, p, s, backward=True),
                     backward="fused", interpret=False)

    def fwd_bwd(u, w1, w2, g):
        y, pull = jax.vjp(lambda u, w1, w2: mk._fused_blocks(u, w1, w2, cfg), u, w1, w2)
        return y, pull(g)

    module = _cuda_lowering(fwd_bwd, bf16(tokens, nb, p), f["w1"], f["w2"], bf16(tokens, nb, s))
    assert module.count("@mosaic_gpu") == 2


def test_lowered_shapes_are_the_benchmark_shapes():
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "monarch_speed.py"
    spec = importlib.util.spec_from_file_location("monarch_speed_shapes", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert sorted(bench.SHAPES) == sorted(_BENCHMARK_SHAPES)
