"""How a global sparsity is spread over layers, and masks from scores.

* ``"uniform"``: every masked matrix gets the same sparsity.
* ``"erk"``: Erdős–Rényi-Kernel (Evci et al., 2020): a layer's density is
  proportional to ``sum(dims) / prod(dims)`` of its matrix (conv kernels count
  their spatial dims), scaled so the total kept count meets the target; layers
  that would exceed density 1 are dense and the rest are rescaled.
* ``"global"``: one magnitude ranking over every masked weight (Global MP,
  Gupta et al.), with at least ``min_kept`` weights kept in every matrix so no
  layer collapses.

A stacked leaf (scanned layers: its layout's stack axes) is a stack of
independent matrices: uniform and ERK give each the leaf's sparsity and
``min_kept`` holds per matrix. Everything here works with a traced sparsity, so
schedules run under ``jit``.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import masks as mask_math
from sparsejax.layout import WeightLayout

__all__ = ["DISTRIBUTIONS", "erk_ratios", "layer_sparsities", "masks_from_scores"]

DISTRIBUTIONS = ("uniform", "erk", "global")


def check_distribution(distribution: str) -> None:
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")


def erk_ratios(layouts: Sequence[WeightLayout]) -> np.ndarray:
    """Unnormalised ERK density of each layer: sum of matrix dims over their product."""
    out = []
    for lay in layouts:
        dims = [lay.shape[a] for a in lay.contract_axes + lay.free_axes]
        out.append(sum(dims) / math.prod(dims))
    return np.asarray(out, dtype=np.float64)


def _erk_sparsities(layouts: Sequence[WeightLayout], sparsity) -> list:
    ratios = jnp.asarray(erk_ratios(layouts), jnp.float32)
    sizes = jnp.asarray([math.prod(l.shape) for l in layouts], jnp.float32)
    target = (1.0 - jnp.asarray(sparsity, jnp.float32)) * sizes.sum()

    def kept(log_eps):
        return jnp.sum(sizes * jnp.minimum(1.0, jnp.exp(log_eps) * ratios))

    # kept() rises monotonically in eps: bisect log(eps) between densities ~0 and all-dense.
    lo = jnp.log(1e-9 / ratios.max())
    hi = jnp.log(1.0 / ratios.min())

    def body(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        too_many = kept(mid) > target
        return jnp.where(too_many, lo, mid), jnp.where(too_many, mid, hi)

    lo, hi = jax.lax.fori_loop(0, 60, body, (lo, hi))
    density = jnp.minimum(1.0, jnp.exp(0.5 * (lo + hi)) * ratios)
    return [1.0 - density[i] for i in range(len(layouts))]


def layer_sparsities(layouts: Sequence[WeightLayout], sparsity, distribution: str) -> list:
    """Per-layer sparsity for ``"uniform"`` or ``"erk"`` (``"global"`` has none up front)."""
    check_distribution(distribution)
    if distribution == "uniform":
        return [sparsity] * len(layouts)
    if distribution == "erk":
        return _erk_sparsities(layouts, sparsity)
    raise ValueError("'global' allocation has no per-layer sparsity before ranking")


def _flat_matrices(lay: WeightLayout, leaf: jax.Array) -> jax.Array:
    mat = lay.to_matrix(leaf)
    return mat.reshape(*mat.shape[:-2], mat.shape[-2] * mat.shape[-1])


def _unflat(lay: WeightLayout, flat: jax.Array) -> jax.Array:
    return lay.from_matrix(flat.reshape(lay.matrix_shape))


def masks_from_scores(scores: Sequence[jax.Array], layouts: Sequence[WeightLayout], sparsity,
                      distribution: str = "uniform", min_kept: int = 1) -> list:
    """Boolean masks (leaf shapes) keeping the highest scores.

    ``scores`` are float arrays of the leaves' shapes; entries scored ``-inf`` are
    kept only if nothing else is left (gradual pruning scores pruned weights
    ``-inf`` so masks stay nested).
    """
    check_distribution(distribution)
    if not scores:
        return []
    if distribution != "global":
        out = []
        for score, lay, s in zip(scores, layouts, layer_sparsities(layouts, sparsity, distribution)):
            flat = _flat_matrices(lay, score.astype(jnp.float32))
            out.append(_unflat(lay, mask_math.keep_fraction(flat, s)))
        return out
    flats = [_flat_matrices(l, s.astype(jnp.float32)) for l, s in zip(layouts, scores)]
    boosted = []
    for flat in flats:
        forced = mask_math.topk_mask(flat, min(int(min_kept), flat.shape[-1]))
        boosted.append(jnp.where(forced, jnp.inf, flat).reshape(-1))
    everything = jnp.concatenate(boosted)
    total = everything.shape[0]
    n_forced = sum(min(int(min_kept), f.shape[-1]) * (f.size // f.shape[-1]) for f in flats)
    if isinstance(sparsity, (int, float)):
        keep = max(mask_math.kept_count(total, sparsity), n_forced)
    else:
        keep = jnp.maximum(jnp.clip(jnp.round((1.0 - sparsity) * total), 1, total), n_forced)
        keep = keep.astype(jnp.int32)
    kept = mask_math.topk_mask(everything, keep)
    out, start = [], 0
    for lay, flat in zip(layouts, flats):
        out.append(_unflat(lay, kept[start:start + flat.size].reshape(flat.shape)))
        start += flat.size
    return out
