"""Mask math on weight matrices, free of any jaxpr.

Every function here works on a *matrix view* of a weight: an array of shape
``(..., K, N)`` where ``K`` is the reduction (input) axis of the matmul, ``N`` the
output axis, and leading axes are independent matrices (stacked layers). The
compiler maps each parameter leaf to and from this view (``compiler/layout.py``),
so Dense, DenseGeneral, conv and scanned kernels all share one implementation.

Masks are boolean arrays; ``True`` keeps a weight. Every mask keeps an exact
number of entries (ties are broken by position), so a requested sparsity is met
exactly, not approximately.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "kept_count",
    "topk_mask",
    "keep_fraction",
    "unstructured_mask",
    "nm_mask",
    "block_mask",
    "channel_mask",
    "density",
    "check_sparsity",
    "apply_mask",
]


def check_sparsity(sparsity: float, where: str) -> None:
    """Raises ValueError unless 0 <= sparsity < 1."""
    if not isinstance(sparsity, (int, float)) or not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"{where}: sparsity must be in [0, 1), got {sparsity!r}")


def kept_count(size: int, sparsity: float) -> int:
    """Entries kept out of ``size`` at ``sparsity``: round((1 - s) * size), at least 1."""
    return max(1, min(size, int(round((1.0 - float(sparsity)) * size))))


def topk_mask(scores: jax.Array, k: int | jax.Array) -> jax.Array:
    """Boolean mask of the ``k`` largest entries along the last axis, exactly ``k`` each.

    ``k`` may be a traced integer (schedules change it under jit). Ties go to the
    lower index, so the count is exact whatever the scores.
    """
    order = jnp.argsort(-scores.astype(jnp.float32), axis=-1, stable=True)
    ranks = jnp.argsort(order, axis=-1, stable=True)
    return ranks < jnp.asarray(k, dtype=ranks.dtype)


def unstructured_mask(scores: jax.Array, sparsity: float | jax.Array) -> jax.Array:
    """Keeps the highest-scoring entries of each ``(K, N)`` matrix.

    ``scores`` has shape ``(..., K, N)``; typically ``|w|`` (magnitude) or random
    numbers. ``sparsity`` may be traced.
    """
    *lead, k_dim, n_dim = scores.shape
    flat = scores.reshape(*lead, k_dim * n_dim)
    return keep_fraction(flat, sparsity).reshape(scores.shape)


def nm_mask(scores: jax.Array, n: int, m: int) -> jax.Array:
    """N:M mask: in every group of ``m`` consecutive entries along K, keep ``n``.

    ``scores`` has shape ``(..., K, N)`` with ``K % m == 0``; the groups run along
    the reduction axis, which is the layout sparse tensor cores and the
    compressed N:M kernels read.
    """
    if not 0 < n <= m:
        raise ValueError(f"N:M needs 0 < n <= m, got n={n}, m={m}")
    *lead, k_dim, n_dim = scores.shape
    if k_dim % m:
        raise ValueError(f"N:M with m={m} needs the reduction size {k_dim} divisible by {m}")
    grouped = scores.reshape(*lead, k_dim // m, m, n_dim)
    grouped = jnp.moveaxis(grouped, -2, -1)  # (..., K/m, N, m)
    keep = topk_mask(grouped, n)
    return jnp.moveaxis(keep, -1, -2).reshape(scores.shape)


def _block_view(x: jax.Array, block: tuple[int, int]) -> jax.Array:
    *lead, k_dim, n_dim = x.shape
    bk, bn = block
    if k_dim % bk or n_dim % bn:
        raise ValueError(f"block {block} does not divide the matrix ({k_dim}, {n_dim})")
    x = x.reshape(*lead, k_dim // bk, bk, n_dim // bn, bn)
    return jnp.moveaxis(x, -3, -2)  # (..., K/bk, N/bn, bk, bn)


def block_mask(scores: jax.Array, sparsity: float | jax.Array,
               block: tuple[int, int]) -> jax.Array:
    """Keeps whole ``block = (bk, bn)`` tiles of the ``(K, N)`` matrix, ranked by score mass.

    A tile's score is the sum of its entries' scores (use ``|w|`` or ``w**2``).
    """
    tiles = _block_view(scores.astype(jnp.float32), block)
    tile_scores = tiles.sum(axis=(-1, -2))  # (..., K/bk, N/bn)
    keep_tiles = unstructured_mask(tile_scores, sparsity)
    keep = jnp.broadcast_to(keep_tiles[..., None, None], tiles.shape)
    keep = jnp.moveaxis(keep, -2, -3)
    return keep.reshape(scores.shape)


def channel_mask(scores: jax.Array, sparsity: float | jax.Array, axis: str) -> jax.Array:
    """Keeps whole rows (``axis="in"``, input neurons along K) or columns
    (``axis="out"``, output channels along N), ranked by summed score."""
    if axis not in ("in", "out"):
        raise ValueError(f"channel axis must be 'in' or 'out', got {axis!r}")
    reduce_axis = -1 if axis == "in" else -2
    channel_scores = scores.astype(jnp.float32).sum(axis=reduce_axis)
    keep = keep_fraction(channel_scores, sparsity)
    keep = jnp.expand_dims(keep, reduce_axis)
    return jnp.broadcast_to(keep, scores.shape)


def keep_fraction(scores: jax.Array, sparsity: float | jax.Array) -> jax.Array:
    """Keeps the top (1 - sparsity) fraction of the last axis; ``sparsity`` may be traced."""
    size = scores.shape[-1]
    if isinstance(sparsity, (int, float)):
        keep = kept_count(size, sparsity)
    else:
        keep = jnp.clip(jnp.round((1.0 - sparsity) * size), 1, size).astype(jnp.int32)
    return topk_mask(scores, keep)


def density(mask: jax.Array) -> float:
    """Fraction of kept entries."""
    return float(jnp.mean(mask.astype(jnp.float32)))


def apply_mask(w: jax.Array, mask: jax.Array, gradient: str = "masked",
               srste_decay: float = 0.0) -> jax.Array:
    """``w * mask`` with the gradient rule ``gradient`` ("masked", "ste" or "srste").

    "masked": d/dw = g * mask. "ste": d/dw = g (straight-through to the dense
    weight). "srste": d/dw = g + srste_decay * (~mask * w) (Zhou et al., 2021).
    """
    m = mask.astype(w.dtype)
    if gradient == "masked":
        return w * m
    if gradient == "ste":
        return _straight_through(w, m, 0.0)
    if gradient == "srste":
        return _straight_through(w, m, float(srste_decay))
    raise ValueError(f"gradient must be 'masked', 'ste' or 'srste', got {gradient!r}")


@jax.custom_vjp
def masked_gradient(w: jax.Array, mask: jax.Array) -> jax.Array:
    """``w`` itself, with the gradient of ``w * mask``: for weights already zero outside the mask.

    Inference from pre-masked weights skips the multiply by the mask (a pass over every
    weight per call), while a gradient taken through it still reaches kept weights only.
    """
    return w


def _masked_gradient_fwd(w, mask):
    return w, mask


def _masked_gradient_bwd(mask, g):
    return g * mask.astype(g.dtype), None


masked_gradient.defvjp(_masked_gradient_fwd, _masked_gradient_bwd)


@jax.custom_vjp
def _straight_through_impl(w, m, decay):
    return w * m


def _straight_through_fwd(w, m, decay):
    return w * m, (w, m, decay)


def _straight_through_bwd(residuals, g):
    w, m, decay = residuals
    dw = g + (decay * (1 - m) * w).astype(g.dtype)
    return dw, jnp.zeros_like(m), jnp.zeros_like(decay)


_straight_through_impl.defvjp(_straight_through_fwd, _straight_through_bwd)


def _straight_through(w, m, decay: float):
    return _straight_through_impl(w, m, jnp.asarray(decay, dtype=w.dtype))
