"""Fused Monarch kernel (interpret mode on CPU) against its plain-JAX reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import monarch
from sparsejax.kernels import monarch_matmul as mk

# (tokens, K, N, nblocks): token count not a multiple of the tile; K and N padded.
CASES = [(13, 27, 43, 2), (20, 32, 16, 4)]
CFG = dict(block_tokens=8, block_out=8, block_in=8, interpret=True)


@pytest.mark.parametrize("t,k,n,nb", CASES)
def test_kernel_forward_and_gradients_match_reference(t, k, n, nb):
    kf, kx, kc = jax.random.split(jax.random.PRNGKey(t + k + n), 3)
    f = monarch.init_factors(kf, k, n, nb)
    x = jax.random.normal(kx, (t, k))
    assert mk.kernel_applies(x.shape, f, platform="cpu")[0]
    y = mk.monarch_matmul(x, f, n, poison=True, **CFG)   # output NaN-filled before the kernel
    assert bool(jnp.all(jnp.isfinite(y)))
    np.testing.assert_allclose(y, mk.monarch_matmul_reference(x, f, n), rtol=1e-5, atol=1e-5)
    ct = jax.random.normal(kc, y.shape)
    loss = lambda fn: (lambda x, f: jnp.sum(fn(x, f) * ct))
    got = jax.grad(loss(lambda x, f: mk.monarch_matmul(x, f, n, **CFG)), argnums=(0, 1))(x, f)
    want = jax.grad(loss(lambda x, f: monarch.matmul_reference(x, f, n)), argnums=(0, 1))(x, f)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_reference_fallback_where_kernel_does_not_apply():
    # nblocks = 3 does not divide q = 4: the fused layout needs equal slices.
    kf, kx = jax.random.split(jax.random.PRNGKey(3))
    f = monarch.init_factors(kf, 10, 13, 3)
    x = jax.random.normal(kx, (5, 10))
    ok, why = mk.kernel_applies(x.shape, f)
    assert not ok and "does not divide" in why
    np.testing.assert_allclose(mk.monarch_matmul(x, f, 13, interpret=True),
                               monarch.matmul_reference(x, f, 13), rtol=1e-6)
    # On GPU, tiles must be powers of two.
    g = monarch.init_factors(kf, 24, 24, 2)
    assert not mk.kernel_applies((4, 24), g, platform="gpu")[0]
    # Off GPU, without interpret, the reference runs.
    g = monarch.init_factors(kf, 16, 32, 2)
    x = jax.random.normal(kx, (5, 16))
    np.testing.assert_allclose(mk.monarch_matmul(x, g), monarch.matmul_reference(x, g), rtol=1e-6)


def test_fused_operands_fold_the_permutation():
    # core(u, A, B) with u in block layout equals the reference with the output interleave undone.
    kf, kx = jax.random.split(jax.random.PRNGKey(5))
    f = monarch.init_factors(kf, 16, 32, 4)
    x = jax.random.normal(kx, (3, 16))
    a, b = mk.fused_operands(f["w1"], f["w2"])
    u = x.reshape(3, 4, 4)
    h = jnp.einsum("tid,jicd->tjic", u, a).reshape(3, 4, -1)
    z = jnp.einsum("tjr,jer->tje", h, b)
    np.testing.assert_allclose(z.transpose(0, 2, 1).reshape(3, -1), monarch.matmul_reference(x, f),
                               rtol=1e-5, atol=1e-6)
