"""DSnoT (Zhang et al., 2024): training-free prune-and-grow on top of a one-shot mask.

Per output, the expected reconstruction error of a sparse layer is
``e = E[x]·(w − ŵ)`` (the mean activation times the weights' error). DSnoT
repeatedly swaps one weight per output: it *grows* the pruned weight that
reduces ``e`` the most (``sign(e)·w_j·E[x_j]`` largest, scaled by the input's
variance as the paper does, so reliable channels come first) and *prunes* the
kept weight with the smallest Wanda score ``|ŵ_j|·‖X_j‖₂`` among those whose
removal moves ``e`` towards zero (in the grown weight's group for N:M, so the
pattern and every count stay exact). A swap is kept only when the layer's
exact reconstruction error ``‖X(W − Ŵ)‖²`` (from the Gram, which holds both
the mean and the variance of the inputs) drops; an output whose best swap
does not help stops. So DSnoT never ends worse than its starting mask on the
calibration data.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from sparsejax.oneshot.structure import Structure


def dsnot_refine(w: jax.Array, w_hat: jax.Array, keep: jax.Array, gram: jax.Array,
                 mean: jax.Array, var: jax.Array, structure: Structure,
                 cycles: int = 50) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(Ŵ, mask, swaps per output)`` after up to ``cycles`` swaps per output.

    Args:
      w: the dense weights ``(K, N)``.
      w_hat, keep: the starting sparse weights and mask (Wanda's, or SparseGPT's
        updated weights); grown weights take their dense value.
      gram, mean, var: the layer input's ``XᵀX``, per-channel mean and variance.
    """
    # Swaps keep every count, so the sparsity itself is not needed: one program per kind.
    return _refine(w, w_hat, keep, gram, mean, var, structure.static_key(), cycles)


@functools.partial(jax.jit, static_argnames=("structure", "cycles"))
def _refine(w: jax.Array, w_hat: jax.Array, keep: jax.Array, gram: jax.Array, mean: jax.Array,
            var: jax.Array, structure: Structure, cycles: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    k, n = w.shape
    w = w.astype(jnp.float32)
    w_hat = jnp.where(keep, w_hat.astype(jnp.float32), 0.0)
    gram = gram.astype(jnp.float32)
    norm = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
    cols = jnp.arange(n)
    group = jnp.arange(k) // (structure.m if structure.kind == "nm" else k)
    inv_var = 1.0 / (var + 1e-6 * (jnp.mean(var) + 1e-12))

    def cycle(_, state):
        w_hat, keep, delta, g_delta, active, swaps = state
        e = jnp.matmul(mean, delta, precision=lax.Precision.HIGHEST)   # (N,) expected error
        sign = jnp.sign(e)
        gain = sign[None, :] * w * mean[:, None]                   # growing j lowers |e| by this
        grow_score = jnp.where(~keep & (gain > 0), gain * inv_var[:, None], -jnp.inf)
        g = jnp.argmax(grow_score, axis=0)                         # (N,)
        can_grow = jnp.isfinite(grow_score[g, cols])
        moves_down = sign[None, :] * w_hat * mean[:, None] <= 0   # pruning j moves e to 0
        same_group = group[:, None] == group[g][None, :]
        prune_score = jnp.where(keep & moves_down & same_group,
                                jnp.abs(w_hat) * norm[:, None], jnp.inf)
        p = jnp.argmin(prune_score, axis=0)
        can_prune = jnp.isfinite(prune_score[p, cols])
        # Exact change of tr(ΔᵀGΔ): Δ_g goes from w_g to 0, Δ_p from w_p − ŵ_p to w_p.
        dg, dp = -w[g, cols], w_hat[p, cols]
        change = (2 * (dg * g_delta[g, cols] + dp * g_delta[p, cols])
                  + dg ** 2 * gram[g, g] + dp ** 2 * gram[p, p] + 2 * dg * dp * gram[g, p])
        accept = active & can_grow & can_prune & (change < 0)
        rows = jnp.arange(k)[:, None]
        grow_hot = (rows == g[None, :]) & accept[None, :]
        prune_hot = (rows == p[None, :]) & accept[None, :]
        keep = (keep | grow_hot) & ~prune_hot
        w_hat = jnp.where(grow_hot, w, jnp.where(prune_hot, 0.0, w_hat))
        delta = w - w_hat
        step = jnp.where(accept[None, :], gram[:, g] * dg[None, :] + gram[:, p] * dp[None, :], 0.0)
        return w_hat, keep, delta, g_delta + step, accept, swaps + accept.astype(jnp.int32)

    delta = w - w_hat
    g_delta = jnp.matmul(gram, delta, precision=lax.Precision.HIGHEST)
    state = (w_hat, keep, delta, g_delta, jnp.ones((n,), bool), jnp.zeros((n,), jnp.int32))
    w_hat, keep, _, _, _, swaps = lax.fori_loop(0, cycles, cycle, state)
    return w_hat, keep, swaps
