"""SparseGPT (Frantar & Alistarh, 2023): prune and update the kept weights (OBS, one pass).

With ``H = XᵀX`` (the layer's Hessian up to a factor), dampened by a fraction
of its mean diagonal, SparseGPT walks the inputs in order: it selects which
weights of a block of inputs to prune by ``w² / [H⁻¹]_jj²``, and, one input at
a time, zeroes the pruned weights and spreads their error ``(w − q) / U_jj``
over the inputs not yet visited through the row ``U_j`` of the upper Cholesky
factor of ``H⁻¹``. Updates to inputs past the block are deferred and applied
as one matmul per block ("lazy batch" updates, 128 inputs by default).

Our matrices are ``W (K, N)``: inputs along rows, so SparseGPT's "columns" are
our rows. :func:`sparsegpt_prune` runs in JAX (float32);
:func:`sparsegpt_reference` is the same algorithm in float64 NumPy without
blocks, written as the paper's pseudocode.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sparsejax import masks as mask_math
from sparsejax.oneshot.structure import Structure


class HessianFactor(NamedTuple):
    upper: jax.Array      # (K, K): upper Cholesky factor of the damped H⁻¹
    damp: float           # dampening used, as a fraction of H's mean diagonal
    dead: jax.Array       # (K,) bool: inputs that were always zero


def _damped(gram, damp):
    h = gram.astype(jnp.float32)
    diag = jnp.diagonal(h)
    dead = diag <= 0
    h = jnp.where(dead[:, None] | dead[None, :], 0.0, h)
    h = h + jnp.diag(jnp.where(dead, 1.0, 0.0))
    scale = jnp.mean(jnp.diagonal(h))
    return h + damp * scale * jnp.eye(h.shape[0], dtype=h.dtype), dead


@jax.jit
def _factor(gram, damp):
    h, dead = _damped(gram, damp)
    h = h / jnp.mean(jnp.diagonal(h))          # scale-free: U changes by a constant only
    lower = jnp.linalg.cholesky(h)
    eye = jnp.eye(h.shape[0], dtype=h.dtype)
    h_inv = jax.scipy.linalg.cho_solve((lower, True), eye)
    h_inv = (h_inv + h_inv.T) / 2
    return jnp.linalg.cholesky(h_inv).T, dead


def inverse_hessian_factor(gram: jax.Array, damp: float = 0.01, max_tries: int = 6) -> HessianFactor:
    """The upper Cholesky factor of ``(H + damp·mean(diag H)·I)⁻¹``.

    Inputs whose channel was always zero get ``H_jj = 1`` (their weights are
    pruned first, their error spreads nowhere). When a factorization is not
    finite (a singular or badly conditioned ``H``), the dampening grows tenfold
    and it is tried again, so the result is never NaN.
    """
    for _ in range(max_tries):
        upper, dead = _factor(gram, jnp.float32(damp))
        if bool(jnp.all(jnp.isfinite(upper))):
            return HessianFactor(upper, float(damp), dead)
        damp = damp * 10.0 if damp > 0 else 0.01
    raise ValueError(f"the Hessian cannot be factorized even with dampening {damp / 10:g}: "
                     "its entries are not finite (NaN or inf in the calibration activations?)")


def block_size_for(k: int, structure: Structure, block: int = 128) -> int:
    """The largest size <= ``block`` that divides ``k`` (and is a multiple of ``m`` for N:M)."""
    step = structure.m if structure.kind == "nm" else 1
    for b in range(min(block, k) // step * step, 0, -step):
        if k % b == 0:
            return b
    raise ValueError(f"no block of inputs divides K = {k} in groups of {step}")


@functools.partial(jax.jit, static_argnames=("structure", "block"))
def _solve(w, upper, dead, block_prune, structure: Structure, block: int):
    k, n = w.shape
    w = jnp.where(dead[:, None], 0.0, w.astype(jnp.float32))
    rows = jnp.arange(k)

    def select_block(w1, d1, count):
        """Keep-mask of a block of inputs with ``count`` weights pruned (per output or jointly)."""
        score = (w1 / d1[:, None]) ** 2
        if structure.kind == "per_output":
            return ~mask_math.topk_mask(-score.T, count).T
        return ~mask_math.topk_mask(-score.reshape(-1), count).reshape(score.shape)

    def block_step(b, carry):
        w, q, keep = carry
        s = b * block
        w1 = lax.dynamic_slice(w, (s, 0), (block, n))
        u1 = lax.dynamic_slice(upper, (s, s), (block, block))
        d1 = jnp.diagonal(u1)
        if structure.kind == "nm":
            keep1 = jnp.ones((block, n), bool)
        else:
            keep1 = select_block(w1, d1, block_prune[b])

        def column_step(i, c):
            w1, q1, err1, keep1 = c
            wi = w1[i]
            qi = jnp.where(keep1[i], wi, 0.0)
            erri = (wi - qi) / d1[i]
            # u1 is upper triangular: row i touches inputs i.. of the block only.
            w1 = w1 - u1[i][:, None] * erri[None, :]
            return w1, q1.at[i].set(qi), err1.at[i].set(erri), keep1

        def group_step(g, c):
            """N:M: choose a group's mask on the weights as updated so far, then walk its m inputs."""
            w1, q1, err1, keep1 = c
            start = g * structure.m
            group = lax.dynamic_slice(w1, (start, 0), (structure.m, n))
            dg = lax.dynamic_slice(d1, (start,), (structure.m,))
            chosen = mask_math.topk_mask(((group / dg[:, None]) ** 2).T, structure.n).T
            keep1 = lax.dynamic_update_slice(keep1, chosen, (start, 0))
            # A static trip count (m), so the loop needs no device-to-host check per input.
            return lax.fori_loop(0, structure.m, lambda j, c: column_step(start + j, c),
                                 (w1, q1, err1, keep1))

        zeros = jnp.zeros((block, n), jnp.float32)
        if structure.kind == "nm":
            w1, q1, err1, keep1 = lax.fori_loop(0, block // structure.m, group_step,
                                                (w1, zeros, zeros, keep1))
        else:
            w1, q1, err1, keep1 = lax.fori_loop(0, block, column_step, (w1, zeros, zeros, keep1))
        # The lazy update: inputs after this block receive the block's errors at once.
        u_rows = lax.dynamic_slice(upper, (s, 0), (block, k))
        later = (rows >= s + block)[:, None]
        w = w - jnp.where(later, jnp.matmul(u_rows.T, err1, precision=lax.Precision.HIGHEST), 0.0)
        q = lax.dynamic_update_slice(q, q1, (s, 0))
        keep = lax.dynamic_update_slice(keep, keep1, (s, 0))
        return w, q, keep

    _, q, keep = lax.fori_loop(0, k // block, block_step,
                               (w, jnp.zeros_like(w), jnp.zeros((k, n), bool)))
    return q, keep


def sparsegpt_prune(w: jax.Array, gram: jax.Array, structure: Structure, *, damp: float = 0.01,
                    block: int = 128) -> tuple[jax.Array, jax.Array, float]:
    """``(Ŵ, mask, dampening used)`` for ``w (K, N)`` and the Gram ``XᵀX (K, K)``.

    ``Ŵ`` is zero where the mask is False and carries SparseGPT's update
    elsewhere; the mask meets ``structure`` exactly.
    """
    k, n = w.shape
    factor = inverse_hessian_factor(gram, damp)
    b = block_size_for(k, structure, block)
    counts = jnp.asarray(structure.block_counts(k, n, b)) if structure.kind != "nm" else \
        jnp.zeros((k // b,), jnp.int32)
    q, keep = _solve(w, factor.upper, factor.dead, counts, structure.static_key(), b)
    return q.astype(w.dtype), keep, factor.damp


# ----------------------------------------------------------------------------- reference


def sparsegpt_reference(w: np.ndarray, gram: np.ndarray, structure: Structure, *,
                        damp: float = 0.01, block: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """SparseGPT in float64 NumPy, one input at a time with immediate (not lazy) updates.

    Mask selection matches :func:`sparsegpt_prune` (per block of ``block``
    inputs, or per group of ``m`` for N:M, by ``w² / U_jj²`` on the weights as
    updated so far); every error is spread over all later inputs at once.
    """
    w = np.array(w, np.float64)
    h = np.array(gram, np.float64)
    k, n = w.shape
    dead = np.diag(h) <= 0
    h[dead, :] = 0
    h[:, dead] = 0
    h[dead, dead] = 1
    w[dead, :] = 0
    h = h + damp * np.mean(np.diag(h)) * np.eye(k)
    h = h / np.mean(np.diag(h))
    upper = np.linalg.cholesky(np.linalg.inv(h)).T
    b = block_size_for(k, structure, block)
    counts = structure.block_counts(k, n, b) if structure.kind != "nm" else None
    q = np.zeros_like(w)
    keep = np.ones((k, n), bool)
    for i in range(k):
        d = np.diag(upper)
        if structure.kind == "nm" and i % structure.m == 0:
            score = (w[i:i + structure.m] / d[i:i + structure.m, None]) ** 2
            order = np.argsort(-score, axis=0, kind="stable")
            keep[i:i + structure.m] = False
            np.put_along_axis(keep[i:i + structure.m], order[:structure.n], True, axis=0)
        elif structure.kind != "nm" and i % b == 0:
            score = (w[i:i + b] / d[i:i + b, None]) ** 2
            c = int(counts[i // b])
            if structure.kind == "per_output":
                order = np.argsort(score, axis=0, kind="stable")
                blk = np.ones_like(score, bool)
                np.put_along_axis(blk, order[:c], False, axis=0)
            else:
                order = np.argsort(score.reshape(-1), kind="stable")
                blk = np.ones(score.size, bool)
                blk[order[:c]] = False
                blk = blk.reshape(score.shape)
            keep[i:i + b] = blk
        q[i] = np.where(keep[i], w[i], 0.0)
        err = (w[i] - q[i]) / upper[i, i]
        w[i:] -= upper[i, i:, None] * err[None, :]
    return q, keep
