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
    """Sparse Doped's dense rank: ``r · (K + N) + p · K · N = K · N`` (rounded down)."""
    return int(sparsity * k * n // (k + n))


def factor_plan(kind: str, k: int, n: int, sparsity: float) -> dict:
    """``name -> (shape of one matrix's factor, kept entries or None for dense)``.

    Rounding a width or a rank moves FLOPs off the dense count; the kept counts absorb
    it, so every transformation multiplies exactly ``K · N`` weights per token (the
    sparsity of each masked factor is then ``s`` up to that rounding).
    """
    if kind == "parallel":
        # the branches share the count: masked jointly, ~K·N/b kept in each
        return {"branches": ((parallel_branches(sparsity), k, n), k * n)}
    if kind == "factorized":
        r = factorized_rank(k, n, sparsity)
        kept_u = min(k * r, int(round(k * n * k / (k + n))))
        return {"u": ((k, r), kept_u), "v": ((r, n), min(r * n, k * n - kept_u))}
    if kind == "doped":
        r = doped_rank(k, n, sparsity)
        return {"s": ((k, n), k * n - r * (k + n)), "u": ((k, r), None), "v": ((r, n), None)}
    raise ValueError(f"unknown Sparse-IFT kind {kind!r}")


def multiply_adds(kind: str, k: int, n: int, sparsity: float) -> int:
    """Multiply-adds per token of one transformed ``(K, N)`` matrix, counted at density
    (the kept entries of each masked factor, every entry of a dense one)."""
    return sum(math.prod(shape) if kept is None else kept
               for shape, kept in factor_plan(kind, k, n, sparsity).values())


def random_mask(key: jax.Array, shape, kept: int, matrix_axes: int = 2) -> jax.Array:
    """A uniform random mask keeping exactly ``kept`` entries of each trailing block of
    ``matrix_axes`` axes (a matrix, or all branches of one)."""
    lead, tail = shape[:len(shape) - matrix_axes], shape[len(shape) - matrix_axes:]
    scores = jax.random.uniform(key, (*lead, math.prod(tail)))
    return mask_math.topk_mask(scores, kept).reshape(shape)


def _normal(key, shape, std, dtype=jnp.float32):
    return std * jax.random.normal(key, shape, dtype)


def init_factors(kind: str, key: jax.Array, matrix: jax.Array, sparsity: float):
    """(factors, masks) replacing the dense ``(*stack, K, N)`` matrix; ``masks`` holds
    None for a dense factor. Weights are fresh, variance-matched to ``matrix``:
    each output's variance is the dense layer's for unit-variance inputs."""
    *stack, k, n = matrix.shape
    std = jnp.std(matrix.astype(jnp.float32))
    plan = factor_plan(kind, k, n, sparsity)
    keys = iter(jax.random.split(key, 2 * len(plan)))
    factors, masks = {}, {}
    for name, (shape, kept) in plan.items():
        shape = (*stack, *shape)
        masks[name] = None if kept is None else random_mask(next(keys), shape, kept,
                                                            len(plan[name][0]))
        factors[name] = _normal(next(keys), shape, 1.0)
    if kind == "parallel":
        # K kept inputs per output over all branches together: the dense scale.
        factors["branches"] = factors["branches"] * std
    elif kind == "factorized":
        kept_u, kept_v, r = plan["u"][1], plan["v"][1], plan["u"][0][1]
        # x·U has the input's per-feature variance (kept_u / r inputs per unit), then V
        # brings the dense output variance K·std² from kept_v / N inputs per output.
        factors["u"] = factors["u"] / math.sqrt(kept_u / r)
        factors["v"] = factors["v"] * std * math.sqrt(k / (kept_v / n))
    elif kind == "doped":
        r = plan["u"][0][1]
        kept_s = plan["s"][1]
        # half the dense output variance from the low-rank product, half from S
        factors["u"] = factors["u"] / math.sqrt(k)
        factors["v"] = factors["v"] * std * math.sqrt(k / (2 * max(r, 1)))
        factors["s"] = factors["s"] * std * math.sqrt(k / (2 * max(kept_s / n, 1)))
    return factors, masks


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

    ``axis`` ("k" or "n") is the FFN hidden dimension, widened to ``wide_width``; the
    mask keeps exactly ``K · N`` entries (the dense count) of each wide matrix. The
    dense weights stay the first units and new units are drawn with the dense leaf's
    standard deviation; all are scaled by ``sqrt(K / kept fan-in)`` so each output
    keeps the dense variance at the new width and density.
    """
    *stack, k, n = matrix.shape
    hidden = k if axis == "k" else n
    extra = wide_width(hidden, sparsity) - hidden
    k_key, m_key = jax.random.split(key)
    std = jnp.std(matrix.astype(jnp.float32))
    extra_shape = (*stack, extra, n) if axis == "k" else (*stack, k, extra)
    fresh = _normal(k_key, extra_shape, std).astype(matrix.dtype)
    wide = jnp.concatenate([matrix, fresh], axis=-2 if axis == "k" else -1)
    scale = math.sqrt(k / (k * n / wide.shape[-1]))    # kept fan-in per output: K·N / N'
    return wide * jnp.asarray(scale, wide.dtype), random_mask(m_key, wide.shape, k * n)
