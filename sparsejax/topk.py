"""Statistical top-k (Spark Transformer): a linear-time, sort-free top-k.

You et al., "Spark Transformer: Reactivating Sparsity in FFN and Attention"
(2025), treat the entries of one row as samples of a Gaussian and keep those
above its ``1 - k/d`` quantile::

    theta(x) = mean(x) + std(x) * Phi^-1(1 - k/d)

* ``mode="soft"``: ``max(x - theta, 0)``, the paper's soft-thresholding form,
  applied to FFN *pre-activations* (Spark, Gemma 3n). It is continuous in ``x``.
* ``mode="hard"``: ``x`` where ``x > theta``, ``fill`` elsewhere (``fill=-inf``
  before a softmax: top-k attention).
* ``mode="mask"``: the boolean ``x > theta``.

All three keep the same entries. On Gaussian rows about ``k`` entries survive;
on heavier tails fewer (the threshold is a moment estimate, not a rank).
:func:`exact_topk_reference` is the sorting twin built on ``lax.top_k``.

Numerics: the statistics are computed in float32 whatever the input dtype, in
one pass over the row (sum and sum of squares shifted by the row's first entry,
so a large mean does not cancel the variance). Constant rows (``std = 0``) keep
nothing in ``hard``/``mask`` mode and give zeros in ``soft`` mode, with finite
gradients; ``Phi^-1(1 - p)`` is evaluated as ``-Phi^-1(p)`` so that tiny
``k/d`` (huge ``d``) does not round ``1 - p`` to 1 and the quantile to ``inf``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtri

__all__ = [
    "statistical_threshold",
    "statistical_topk",
    "exact_topk_reference",
    "resolve_k_frac",
]

_MODES = ("soft", "hard", "mask")
# The largest keep fraction below 1 in float32: Phi^-1 stays finite (about -5.3).
_MAX_FRAC = 1.0 - 2.0**-24
_MIN_FRAC = 2.0**-126


def resolve_k_frac(d: int, k: Any = None, k_frac: Any = None, where: str = "statistical_topk"):
    """The kept fraction ``k / d`` from exactly one of ``k`` and ``k_frac``.

    ``k`` is an entry count ``0 < k < d``; ``k_frac`` a fraction ``0 < k_frac < 1``.
    Either may be a traced scalar (schedules), in which case it is not checked.
    Returns a Python float or a float32 scalar array.
    """
    if (k is None) == (k_frac is None):
        raise ValueError(f"{where}: give exactly one of k (an entry count) and k_frac (a fraction); "
                         f"got k={k!r}, k_frac={k_frac!r}")
    if k is not None:
        if isinstance(k, jax.Array):
            return k.astype(jnp.float32) / d
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise TypeError(f"{where}: k must be an int (entries kept per row), got {k!r}")
        if not 0 < int(k) < d:
            raise ValueError(f"{where}: k must satisfy 0 < k < d = {d} (the size of the reduced axis), "
                             f"got k={k}")
        return int(k) / d
    if isinstance(k_frac, jax.Array):
        return k_frac.astype(jnp.float32)
    if isinstance(k_frac, bool) or not isinstance(k_frac, (int, float)):
        raise TypeError(f"{where}: k_frac must be a float in (0, 1), got {k_frac!r}")
    if not 0.0 < float(k_frac) < 1.0:
        raise ValueError(f"{where}: k_frac must satisfy 0 < k_frac < 1, got {k_frac!r}")
    return float(k_frac)


def _check_axis(x, axis: int, where: str) -> int:
    if not isinstance(axis, int) or isinstance(axis, bool):
        raise TypeError(f"{where}: axis must be an int, got {axis!r}")
    if not -x.ndim <= axis < x.ndim or x.ndim == 0:
        raise ValueError(f"{where}: axis={axis} is out of range for x of shape {x.shape}")
    return axis % x.ndim


def _upper_quantile(frac) -> jax.Array:
    """``Phi^-1(1 - frac)``, computed as ``-Phi^-1(frac)`` (exact for tiny ``frac``)."""
    frac = jnp.clip(jnp.asarray(frac, jnp.float32), _MIN_FRAC, _MAX_FRAC)
    return -ndtri(frac)


def _safe_sqrt(v):
    # sqrt has an infinite slope at 0: constant rows would turn gradients into NaN.
    positive = v > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, v, 1.0)), 0.0)


def statistical_threshold(x: jax.Array, *, k: Any = None, k_frac: Any = None, axis: int = -1,
                          where: jax.Array | None = None,
                          stop_gradient: bool = False) -> jax.Array:
    """The statistical top-k threshold ``mean + std * Phi^-1(1 - k/d)`` along ``axis``.

    Args:
      x: any float array; statistics are taken in float32.
      k: entries to keep per row (``0 < k < d``); or
      k_frac: the fraction to keep (``0 < k_frac < 1``). Exactly one of the two.
      axis: the axis that holds one row.
      where: optional boolean mask broadcastable to ``x``: only ``True`` entries
        count (masked attention scores, padding). ``k`` then counts entries among
        the valid ones of each row; rows with at most ``k`` valid entries get
        ``-inf`` (keep every valid entry). ``k_frac`` is a fraction of the valid
        entries.
      stop_gradient: treat the threshold as a constant in the backward pass.

    Returns:
      float32 thresholds with ``axis`` kept as size 1 (broadcastable to ``x``).
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"statistical_threshold: x must be a float array, got dtype {x.dtype}")
    axis = _check_axis(x, axis, "statistical_threshold")
    d = x.shape[axis]
    xf = x.astype(jnp.float32)
    # Shift by the first entry of each row (one sample, within a few std of the mean):
    # the one-pass variance E[(x-c)^2] - E[x-c]^2 then does not cancel catastrophically.
    if where is None:
        frac = resolve_k_frac(d, k, k_frac, "statistical_threshold")
        shift = jax.lax.stop_gradient(jax.lax.slice_in_dim(xf, 0, 1, axis=axis))
        # Summing x - shift (not x) also makes a constant row's mean its value bit for bit,
        # so that row keeps nothing.
        mean_c = jnp.sum(xf - shift, axis=axis, keepdims=True) / d
        var = jnp.sum(jnp.square(xf - shift), axis=axis, keepdims=True) / d - mean_c * mean_c
        mean = mean_c + shift
        keep_all = None
    else:
        where = jnp.broadcast_to(jnp.asarray(where, bool), x.shape)
        count = jnp.sum(where, axis=axis, keepdims=True).astype(jnp.float32)
        safe_count = jnp.maximum(count, 1.0)
        if k is not None:
            if not isinstance(k, jax.Array):
                resolve_k_frac(d + 1, k, None, "statistical_threshold")   # type and k > 0 checks only
            frac = jnp.asarray(k, jnp.float32) / safe_count
            keep_all = count <= jnp.asarray(k, jnp.float32)
        else:
            frac = resolve_k_frac(d, None, k_frac, "statistical_threshold")
            keep_all = None
        first_valid = jnp.argmax(where, axis=axis, keepdims=True)
        shift = jax.lax.stop_gradient(jnp.take_along_axis(xf, first_valid, axis=axis))
        centered = jnp.where(where, xf - shift, 0.0)
        mean_c = jnp.sum(centered, axis=axis, keepdims=True) / safe_count
        var = jnp.sum(centered * centered, axis=axis, keepdims=True) / safe_count - mean_c * mean_c
        mean = mean_c + shift
    theta = mean + _safe_sqrt(var) * _upper_quantile(frac)
    if keep_all is not None:
        theta = jnp.where(keep_all, -jnp.inf, theta)
    if stop_gradient:
        theta = jax.lax.stop_gradient(theta)
    return theta


def statistical_topk(x: jax.Array, *, k: Any = None, k_frac: Any = None, axis: int = -1,
                     mode: str = "soft", fill: float = 0.0, where: jax.Array | None = None,
                     stop_gradient_threshold: bool = False) -> jax.Array:
    """Spark's statistical top-k of ``x`` along ``axis`` (linear time, no sort).

    Plain JAX (XLA); :func:`sparsejax.kernels.statistical_topk.statistical_topk`
    takes the same arguments and an ``impl`` that picks its one-pass kernel.

    Args:
      x: float array (any float dtype; the output keeps it, except ``mode="mask"``).
      k: entries to keep per row (``0 < k < d``); or
      k_frac: the fraction to keep (``0 < k_frac < 1``). Exactly one of the two;
        either may be a traced scalar.
      axis: the reduced axis (one row per position of the other axes).
      mode: ``"soft"`` -> ``max(x - theta, 0)`` (apply to pre-activations);
        ``"hard"`` -> ``x`` above ``theta``, ``fill`` elsewhere; ``"mask"`` ->
        boolean ``x > theta``.
      fill: the value of dropped entries in ``"hard"`` mode (``-jnp.inf`` before a
        softmax). Ignored otherwise.
      where: optional validity mask (see :func:`statistical_threshold`); invalid
        entries are never kept (``0`` in soft mode, ``fill`` in hard mode).
      stop_gradient_threshold: no gradient through ``theta`` (its mean and std).
        Default ``False``, as in the paper and Gemma 3n.

    Returns:
      An array of ``x``'s shape: ``x``'s dtype, or bool for ``mode="mask"``.
    """
    if mode not in _MODES:
        raise ValueError(f"statistical_topk: mode must be one of {_MODES}, got {mode!r}")
    x = jnp.asarray(x)
    theta = statistical_threshold(x, k=k, k_frac=k_frac, axis=axis, where=where,
                                  stop_gradient=stop_gradient_threshold)
    xf = x.astype(jnp.float32)
    keep = xf > theta
    if where is not None:
        keep = keep & where
    if mode == "mask":
        return keep
    if mode == "hard":
        return jnp.where(keep, x, jnp.asarray(fill, x.dtype))
    out = jnp.where(keep, xf - theta, 0.0)   # = max(x - theta, 0) on valid entries
    return out.astype(x.dtype)


def exact_topk_reference(x: jax.Array, *, k: Any = None, k_frac: Any = None, axis: int = -1,
                         mode: str = "hard", fill: float = 0.0) -> jax.Array:
    """Exact top-k with ``lax.top_k`` (sorting), the twin of :func:`statistical_topk`.

    Keeps exactly ``k`` entries per row (``k = round(k_frac * d)`` when a fraction
    is given; ties go to the lower index). ``"soft"`` subtracts the largest
    dropped value, ``max(x - x_(k+1), 0)``, so exactly the kept entries are
    positive up to ties. Modes and ``fill`` as in :func:`statistical_topk`;
    ``k`` must be static.
    """
    if mode not in _MODES:
        raise ValueError(f"exact_topk_reference: mode must be one of {_MODES}, got {mode!r}")
    x = jnp.asarray(x)
    axis = _check_axis(x, axis, "exact_topk_reference")
    d = x.shape[axis]
    frac = resolve_k_frac(d, k, k_frac, "exact_topk_reference")
    if isinstance(frac, jax.Array):
        raise TypeError("exact_topk_reference: k and k_frac must be static (lax.top_k needs a static k)")
    kk = int(k) if k is not None else min(d - 1, max(1, int(round(frac * d))))
    xm = jnp.moveaxis(x, axis, -1)
    values, idx = jax.lax.top_k(xm, min(kk + 1, d))
    keep = jnp.zeros(xm.shape, bool)
    keep = jnp.put_along_axis(keep, idx[..., :kk], True, axis=-1, inplace=False)
    if mode == "mask":
        out = keep
    elif mode == "hard":
        out = jnp.where(keep, xm, jnp.asarray(fill, x.dtype))
    else:
        theta = values[..., kk:kk + 1].astype(jnp.float32)
        out = jnp.where(keep, jnp.maximum(xm.astype(jnp.float32) - theta, 0.0), 0.0).astype(x.dtype)
    return jnp.moveaxis(out, -1, axis)

