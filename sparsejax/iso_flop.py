"""Sparse Iso-FLOP Transformations (Sparse-IFT; Saxena et al., Cerebras 2023): the math.

Each transformation replaces a dense ``(K, N)`` matmul by a bigger sparse one of the
same FLOPs, counted at density (a kept weight costs one multiply-add per token; a
pruned one costs nothing), parameterised by one sparsity ``s`` (density ``p = 1 - s``):

* Sparse Wide: the FFN hidden width ``h`` grows to ``h / p`` and up, gate and down
  are trained at sparsity ``s``. The paper widens every layer on both sides by
  ``1 / sqrt(p)`` (so ``p · (K / sqrt p) · (N / sqrt p) = K · N``); at an FFN site the
  residual width ``d`` is shared with the rest of the model and only ``h`` can grow,
  so iso-FLOP needs the whole factor ``1 / p`` on that one dimension.
* Sparse Parallel: ``1 / p`` sparse branches of shape ``(K, N)``, summed.
* Sparse Factorized: ``W = U · V`` with ``U (K, r)``, ``V (r, N)`` both at sparsity
  ``s`` and ``r = K·N / (p·(K + N))``.
* Sparse Doped: ``W = U · V + S`` with ``U``, ``V`` dense at rank
  ``r = s·K·N / (K + N)`` and ``S (K, N)`` at sparsity ``s``.

Masks are uniform random per matrix (the paper's static sparsity at init; any mask
optimizer that keeps counts keeps the FLOPs). Fresh weights are drawn so each
output has the dense leaf's variance: ``std(dense) · sqrt(K / fan_in_kept)``, with
``fan_in_kept`` the kept inputs per output of the new matrix.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from sparsejax import masks as mask_math


def wide_width(hidden: int, sparsity: float) -> int:
    """Sparse Wide's hidden width: ``round(hidden / (1 - s))``."""
    return int(round(hidden / (1.0 - sparsity)))


def parallel_branches(sparsity: float) -> int:
    """Sparse Parallel's branch count ``1 / (1 - s)`` (an integer, or iso-FLOP fails)."""
    return max(1, int(round(1.0 / (1.0 - sparsity))))


def parallel_is_iso_flop(sparsity: float, tolerance: float = 0.01) -> bool:
    return abs(parallel_branches(sparsity) * (1.0 - sparsity) - 1.0) <= tolerance


def factorized_rank(k: int, n: int, sparsity: float) -> int:
    """Sparse Factorized's rank: ``p · r · (K + N) = K · N``."""
    return max(1, int(round(k * n / ((1.0 - sparsity) * (k + n)))))


def doped_rank(k: int, n: int, sparsity: float) -> int:
    """Sparse Doped's dense rank: ``r · (K + N) + p · K · N = K · N``."""
    return int(round(sparsity * k * n / (k + n)))


def random_mask(key: jax.Array, shape, sparsity: float) -> jax.Array:
    """Uniform random mask at ``sparsity`` per trailing ``(K, N)`` matrix."""
    return mask_math.unstructured_mask(jax.random.uniform(key, shape), sparsity)


def multiply_adds(kind: str, k: int, n: int, sparsity: float) -> int:
    """Multiply-adds per token of one transformed ``(K, N)`` matrix, counted at density
    (the kept entries of each masked factor, every entry of a dense one)."""
    kept = lambda size: mask_math.kept_count(size, sparsity)
    if kind == "parallel":
        return parallel_branches(sparsity) * kept(k * n)
    if kind == "factorized":
        r = factorized_rank(k, n, sparsity)
        return kept(k * r) + kept(r * n)
    if kind == "doped":
        return doped_rank(k, n, sparsity) * (k + n) + kept(k * n)
    raise ValueError(f"unknown Sparse-IFT kind {kind!r}")


def _normal(key, shape, std, dtype=jnp.float32):
    return std * jax.random.normal(key, shape, dtype)


def init_factors(kind: str, key: jax.Array, matrix: jax.Array, sparsity: float):
    """(factors, masks) replacing the dense ``(*stack, K, N)`` matrix; ``masks`` holds
    None for a dense factor. Weights are fresh, variance-matched to ``matrix``."""
    *stack, k, n = matrix.shape
    std = jnp.std(matrix.astype(jnp.float32))
    p = 1.0 - sparsity
    keys = jax.random.split(key, 6)
    if kind == "parallel":
        b = parallel_branches(sparsity)
        shape = (*stack, b, k, n)
        # b branches of kept fan-in p·K each sum to a kept fan-in of K: the dense scale.
        return ({"branches": _normal(keys[0], shape, std)},
                {"branches": random_mask(keys[1], shape, sparsity)})
    if kind == "factorized":
        r = factorized_rank(k, n, sparsity)
        # x·U has the input's per-feature variance; (x·U)·V the dense output variance.
        u = _normal(keys[0], (*stack, k, r), 1.0 / math.sqrt(k * p))
        v = _normal(keys[1], (*stack, r, n), std * math.sqrt(k / (r * p)))
        return ({"u": u, "v": v}, {"u": random_mask(keys[2], u.shape, sparsity),
                                   "v": random_mask(keys[3], v.shape, sparsity)})
    if kind == "doped":
        r = doped_rank(k, n, sparsity)
        # Half the output variance from the low-rank product, half from the sparse residual.
        u = _normal(keys[0], (*stack, k, r), 1.0 / math.sqrt(k))
        v = _normal(keys[1], (*stack, r, n), std * math.sqrt(k / (2 * max(r, 1))))
        s = _normal(keys[2], (*stack, k, n), std / math.sqrt(2 * p))
        return ({"s": s, "u": u, "v": v},
                {"s": random_mask(keys[3], s.shape, sparsity), "u": None, "v": None})
    raise ValueError(f"unknown Sparse-IFT kind {kind!r}")


def to_dense(kind: str, factors) -> jax.Array:
    """The ``(*stack, K, N)`` matrix the (already masked) factors compute."""
    if kind == "parallel":
        return jnp.sum(factors["branches"], axis=-3)
    product = jnp.matmul(factors["u"], factors["v"])
    return product + factors["s"] if kind == "doped" else product


def matmul(kind: str, x2: jax.Array, factors) -> jax.Array:
    """``x2 (..., K) @ W`` from the (already masked) factors of one matrix (no stack axes)."""
    if kind == "parallel":
        # One dot with the summed branches: the same product and gradients as summing
        # branch outputs, at a dense product's cost rather than b of them.
        return x2 @ jnp.sum(factors["branches"], axis=0).astype(x2.dtype)
    low_rank = (x2 @ factors["u"].astype(x2.dtype)) @ factors["v"].astype(x2.dtype)
    return low_rank + x2 @ factors["s"].astype(x2.dtype) if kind == "doped" else low_rank


def widen_init(key: jax.Array, matrix: jax.Array, axis: str, sparsity: float):
    """Sparse Wide's ``(*stack, K', N')`` matrix and mask from the dense ``(*stack, K, N)``.

    ``axis`` ("k" or "n") is the FFN hidden dimension, widened to ``wide_width``. The
    dense weights stay the first units; new units are drawn with the dense leaf's
    standard deviation. Everything is scaled by ``sqrt(K / kept fan-in)`` so each
    output keeps the dense variance at the new width and density.
    """
    *stack, k, n = matrix.shape
    hidden = k if axis == "k" else n
    extra = wide_width(hidden, sparsity) - hidden
    k_key, m_key = jax.random.split(key)
    std = jnp.std(matrix.astype(jnp.float32))
    extra_shape = (*stack, extra, n) if axis == "k" else (*stack, k, extra)
    fresh = _normal(k_key, extra_shape, std).astype(matrix.dtype)
    wide = jnp.concatenate([matrix, fresh], axis=-2 if axis == "k" else -1)
    scale = math.sqrt(k / (wide.shape[-2] * (1.0 - sparsity)))
    return wide * jnp.asarray(scale, wide.dtype), random_mask(m_key, wide.shape, sparsity)
