"""Monarch as two block-sparse products: packing from the factors, the product and its
gradients against the Monarch reference (the block-sparse kernel in interpret mode)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import monarch
from sparsejax.kernels import monarch_block_sparse as mbs
from sparsejax.kernels import monarch_matmul as mm

from kernel_testing import assert_written, jit_call, normal, rel_error

# (K, N, nblocks, (L's block, R's block)): square, up, down, and K and N padded to the blocks
SHAPES = [(64, 64, 4, ((8, 8), (4, 8))), (64, 128, 4, ((4, 8), (4, 8))),
          (128, 64, 4, ((8, 4), (2, 4))), (62, 118, 4, ((4, 8), (4, 10))),
          (96, 96, 2, ((8, 16), (8, 16)))]


def _factors(seed, k, n, nb, dtype=jnp.float32):
    # jitted, and below the products and their gradients: one program each, where op by op
    # every operation at every new shape was a program to compile
    return jax.jit(lambda key: monarch.init_factors(key, k, n, nb, dtype))(jax.random.key(seed))


@pytest.mark.parametrize("k,n,nb,blocks", SHAPES)
def test_product_matches_the_monarch_reference(k, n, nb, blocks):
    f = _factors(k + n, k, n, nb)
    x = normal(1, (3, 5, k))
    ref = jit_call(mm.monarch_matmul_reference, x, f, out_features=n)
    y = jit_call(mbs.monarch_matmul_block_sparse, x, f, out_features=n, blocks=blocks, interpret=True,
                 poison=True)
    assert y.shape == ref.shape
    assert_written(y)
    assert rel_error(y, ref) < 1e-5


@pytest.mark.parametrize("k,n,nb,blocks", SHAPES[1:4])
def test_gradients_match_the_monarch_reference(k, n, nb, blocks):
    f = _factors(2 * k + n, k, n, nb)
    x = normal(2, (9, k))
    loss = lambda fn: jax.jit(jax.grad(lambda x, f: jnp.sum(jnp.sin(fn(x, f))), argnums=(0, 1)))(x, f)
    got = loss(lambda x, f: mbs.monarch_matmul_block_sparse(x, f, n, blocks=blocks, interpret=True))
    want = loss(lambda x, f: mm.monarch_matmul_reference(x, f, n))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert rel_error(a, b) < 1e-5


def test_bf16_rounds_the_intermediate_as_the_reference_does():
    k, n, nb = 64, 128, 4
    f = _factors(5, k, n, nb, jnp.bfloat16)
    x = jax.random.normal(jax.random.key(3), (16, k)).astype(jnp.bfloat16)
    y = mbs.monarch_matmul_block_sparse(x, f, n, blocks=((4, 8), (4, 8)), interpret=True)
    assert y.dtype == jnp.bfloat16
    ref32 = mm.monarch_matmul_reference(x.astype(jnp.float32), jax.tree.map(
        lambda a: a.astype(jnp.float32), f), n)
    # bf16 operands with float32 accumulation: the error of one bf16 rounding per stage
    assert rel_error(y, ref32) < 1e-2
    assert rel_error(y, mm.monarch_matmul_reference(x, f, n)) < 1e-2


def test_packed_factors_are_the_block_structure_the_module_names():
    k, n, nb = 64, 128, 4
    f = _factors(7, k, n, nb)
    w1, w2 = f["w1"], f["w2"]
    q, p, s = w1.shape[1], w1.shape[2], w2.shape[1]
    left, right = mbs.pack_factors(w1, w2, ((4, 8), (4, 8)))
    assert left.density == pytest.approx(1 / nb) and right.density == pytest.approx(1 / nb)
    dl, dr = np.asarray(left.to_dense()), np.asarray(right.to_dense())
    w1r = np.asarray(mm._w1_rows_block_major(w1))
    for i in range(nb):      # L is block-diagonal: L[i p + a, i q + m] = w1r[i, m, a]
        np.testing.assert_array_equal(dl[i * p:(i + 1) * p, i * q:(i + 1) * q], w1r[i].T)
    assert np.count_nonzero(dl) == np.count_nonzero(w1r)
    run = q // nb            # R[i q + j run + c1, j s + e] = w2[j, e, i run + c1]
    for i in range(nb):
        for j in range(nb):
            np.testing.assert_array_equal(dr[i * q + j * run:i * q + (j + 1) * run, j * s:(j + 1) * s],
                                          np.asarray(w2[j, :, i * run:(i + 1) * run]).T)
    assert np.count_nonzero(dr) == np.count_nonzero(np.asarray(w2))
    # and together, with P2, they are the Monarch matrix
    dense = (dl @ dr).reshape(nb * p, nb, s).transpose(0, 2, 1).reshape(nb * p, nb * s)
    chex.assert_trees_all_close(dense, np.asarray(monarch.to_dense(f, k, n)), rtol=1e-5, atol=1e-6)


def test_kernel_tiles_and_refusals_name_the_reason():
    # nblocks 4 at the end-to-end LM's and the Monarch issue's sizes tile; nblocks 16 at
    # 4096 -> 16384 leaves runs of 16 rows, below the GPU kernel's 64
    assert mbs.blocks_for(4, 256, 256, 1024) == ((128, 128), (64, 128))
    assert mbs.blocks_for(4, 1024, 1024, 4096) == ((128, 128), (128, 128))
    assert mbs.blocks_for(16, 256, 256, 1024) is None
    big = _factors(0, 4096, 16384, 16, jnp.bfloat16)
    assert "no block side in (128, 64)" in mbs.supported((8192, 4096), big)
    odd = _factors(0, 60, 120, 4)           # q = 15
    with pytest.raises(ValueError, match="q = 15 is not a multiple of nblocks = 4"):
        mbs.monarch_matmul_block_sparse(jnp.ones((2, 60)), odd, 120, blocks=((5, 5), (5, 5)))
    with pytest.raises(ValueError, match="block side 8 does not divide q / nblocks = 4"):
        mbs.monarch_matmul_block_sparse(jnp.ones((2, 64)), _factors(0, 64, 128, 4), 128,
                                        blocks=((8, 8), (8, 8)))


@pytest.mark.parametrize("d,hidden,nb", [(64, 128, 4), (32, 96, 2)])
def test_two_monarch_products_in_a_row_skip_the_output_interleave_between_them(d, hidden, nb):
    # The producer leaves its output block-major (no P2), an elementwise op runs on it as it
    # is, and the consumer's L rows are permuted instead: the same function, forward and
    # gradients, as the reference chain.
    f1 = _factors(1, d, hidden, nb)
    f2 = _factors(2, hidden, d, nb)
    x = normal(3, (6, d))
    small = dict(sides=(8, 4, 2, 1))
    b1 = mbs.blocks_for(nb, *f1["w1"].shape[1:], f1["w2"].shape[1], **small)
    b2 = mbs.blocks_for(nb, *f2["w1"].shape[1:], f2["w2"].shape[1], interleaved=nb, **small)

    def chain(x, f1, f2):
        z = mbs.monarch_matmul_block_sparse(x, f1, hidden, blocks=b1, block_major_output=True,
                                            interpret=True, poison=True)
        return mbs.monarch_matmul_block_sparse(jax.nn.gelu(z), f2, d, blocks=b2, interleaved_input=nb,
                                               interpret=True, poison=True)

    def reference(x, f1, f2):
        return mm.monarch_matmul_reference(jax.nn.gelu(mm.monarch_matmul_reference(x, f1, hidden)), f2, d)

    y = jax.jit(chain)(x, f1, f2)
    assert_written(y)
    assert rel_error(y, jax.jit(reference)(x, f1, f2)) < 1e-5
    grads = lambda fn: jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a))), argnums=(0, 1, 2)))(x, f1, f2)
    for a, b in zip(jax.tree.leaves(grads(chain)), jax.tree.leaves(grads(reference))):
        assert rel_error(a, b) < 1e-5
    # without the interleave the producer's output is a permutation of the reference's
    z = jit_call(mbs.monarch_matmul_block_sparse, x, f1, out_features=hidden, blocks=b1,
                 block_major_output=True, interpret=True)
    s = f1["w2"].shape[1]
    natural = np.asarray(z).reshape(6, nb, s).transpose(0, 2, 1).reshape(6, hidden)
    assert rel_error(natural, jit_call(mm.monarch_matmul_reference, x, f1, out_features=hidden)) < 1e-5


def test_interleaved_and_block_major_refuse_what_they_cannot_order():
    f = _factors(4, 64, 128, 4)
    with pytest.raises(ValueError, match="block-major output needs out_features = nblocks \\* s = 128"):
        mbs.monarch_matmul_block_sparse(jnp.ones((2, 64)), f, 120, blocks=((4, 8), (4, 8)),
                                        block_major_output=True)
    with pytest.raises(ValueError, match="interleaved input needs all nblocks \\* p = 64 features"):
        mbs.monarch_matmul_block_sparse(jnp.ones((2, 62)), f, 128, blocks=((4, 8), (4, 8)),
                                        interleaved_input=4)
    # p = 16 interleaved by 4 blocks: runs of 4 rows, so an 8-row tile spans two input blocks
    with pytest.raises(ValueError, match="block side 8 does not divide p / interleaved = 4"):
        mbs.monarch_matmul_block_sparse(jnp.ones((2, 64)), f, 128, blocks=((8, 8), (4, 8)),
                                        interleaved_input=4)
