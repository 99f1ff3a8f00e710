"""Training N:M sparse weights: SR-STE and Progressive Gradient Flow.

Both keep dense weights that keep training and an N:M mask (groups of ``m``
consecutive entries along the matrix's K axis, the layout sparse tensor cores
read) recomputed from ``|w|`` after every update and held in the state.

* :func:`srste` (Zhou et al., 2021): the forward uses the hard mask with a
  straight-through gradient, and the optimizer adds SR-STE's decay term
  ``decay * (~mask * w)`` to the gradient, pulling pruned weights towards zero
  so the mask settles. Use it with ``gradient="ste"`` masking in the forward
  (``"srste"`` there would add the term twice).
* :func:`progressive_nm` (Bambhaniya et al., 2024): restrict the gradient flow
  to pruned weights progressively. ``decay="linear"`` or ``"exponential"``:
  the forward uses a soft mask ``w * (m + beta * (1 - m))`` whose strength
  ``beta`` falls from 1 at ``begin_step`` to 0 at ``end_step`` (read it with
  :func:`current_mask_strength`; :func:`sparsejax.optim.forward_masks` hands the
  soft masks to the forward pass, :func:`soft_mask_params` applies them to weights;
  at 0 it is the hard mask). ``decay="stepwise"``: a sequence of N:M patterns, e.g.
  dense -> 7:8 -> 4:8 -> 2:8, switching at ``boundaries``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from sparsejax import masks as mask_math
from sparsejax.optim import _common, masking
from sparsejax.optim.masking import mask_state
from sparsejax.optim.schedules import exponential_decay, linear_decay

__all__ = ["NMState", "srste", "progressive_nm", "soft_mask_params", "current_mask_strength"]


@mask_state
class NMState(NamedTuple):
    """State of the N:M transforms: step, current masks, mask strength (0 = hard), inner state."""

    step: jax.Array
    masks: Any
    strength: jax.Array
    inner_state: Any


def soft_mask_params(params: Any, masks: Any, strength) -> Any:
    """``w * (m + strength * (1 - m))`` at masked leaves: the forward weights under PGF's decaying mask."""
    soft = masking.soft_masks(masks, strength)
    return jax.tree.map(lambda p, m: p if m is None else p * m.astype(p.dtype), params, soft,
                        is_leaf=lambda x: x is None)


def current_mask_strength(opt_state: Any) -> jax.Array:
    """The mask strength held by the N:M transform inside ``opt_state``."""
    found = [s for s in masking.find_mask_states(opt_state) if isinstance(s, NMState)]
    if len(found) != 1:
        raise ValueError(f"opt_state holds {len(found)} N:M states; expected exactly one")
    return found[0].strength


def _check_nm(n, m, name="n:m"):
    for v, label in ((n, "n"), (m, "m")):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{name}: {label} must be an int, got {v!r}")
    if not 0 < n <= m:
        raise ValueError(f"{name}: needs 0 < n <= m, got {n}:{m}")


def _nm_transform(inner, patterns: Sequence[tuple[int, int]], stage_fn: Callable,
                  strength_fn: Callable, decay: float, layouts, where, name: str):
    if not decay >= 0:
        raise ValueError(f"{name}: decay must be >= 0, got {decay!r}")
    inner = _common.with_extra_args(inner)

    def leaf_masks(targets, weights, stage):
        def for_pattern(n, m):
            return lambda: [lay.from_matrix(mask_math.nm_mask(jnp.abs(lay.to_matrix(w)), n, m))
                            for w, lay in zip(weights, targets.layouts)]
        branches = [for_pattern(n, m) for n, m in patterns]
        if len(branches) == 1:
            return branches[0]()
        return jax.lax.switch(stage, branches)

    def resolve(params):
        targets = _common.resolve_targets(params, layouts, where)
        for path, lay in zip(targets.paths, targets.layouts):
            for n, m in patterns:
                if lay.k % m:
                    raise ValueError(f"{name}: parameter {path} has reduction size K={lay.k} "
                                     f"(layout {lay.describe()}), not divisible by m={m}")
        return targets

    def init_fn(params):
        targets = resolve(params)
        weights = targets.take(targets.treedef.flatten_up_to(params))
        step = jnp.zeros([], jnp.int32)
        masks = leaf_masks(targets, weights, stage_fn(step))
        return NMState(step, targets.tree(masks), jnp.asarray(strength_fn(step), jnp.float32),
                       inner.init(params))

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError(f"{name} needs params: call update(grads, state, params)")
        targets = resolve(params)
        masks = targets.masks_of(state.masks)
        g = targets.treedef.flatten_up_to(updates)
        p = targets.treedef.flatten_up_to(params)
        for i, mk in zip(targets.index, masks):
            g[i] = g[i] + (decay * jnp.where(mk, 0, p[i])).astype(g[i].dtype)
        grads = jax.tree_util.tree_unflatten(targets.treedef, g)
        inner_updates, inner_state = inner.update(grads, state.inner_state, params, **extra_args)
        u = targets.treedef.flatten_up_to(inner_updates)
        new_weights = [p[i] + u[i] for i in targets.index]
        step = state.step + 1
        new_masks = leaf_masks(targets, new_weights, stage_fn(step))
        return inner_updates, NMState(step, targets.tree(new_masks),
                                      jnp.asarray(strength_fn(step), jnp.float32), inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def srste(inner: optax.GradientTransformation | None, n: int = 2, m: int = 4, *,
          decay: float = 2e-4, layouts: Any = None,
          where: Callable | None = None) -> optax.GradientTransformationExtraArgs:
    """SR-STE around ``inner``: adds ``decay * (~mask * w)`` to gradients; masks are N:M of ``|w|``.

    Args:
      inner: the optimizer (default identity).
      n, m: keep ``n`` of every ``m`` consecutive weights along K.
      decay: SR-STE's lambda_w (the paper uses 2e-4).
      layouts, where: which leaves are masked (see :func:`sparsejax.optim.prune`).
    """
    _check_nm(n, m, "srste")
    return _nm_transform(inner, [(n, m)], lambda t: 0, lambda t: 0.0, decay, layouts, where,
                         "srste")


def progressive_nm(inner: optax.GradientTransformation | None, n: int = 2, m: int = 8, *,
                   decay: str = "linear", begin_step: int = 0, end_step: int = 1000,
                   rate: float = 5.0, patterns: Sequence[tuple[int, int]] | None = None,
                   boundaries: Sequence[int] | None = None, srste_decay: float = 0.0,
                   layouts: Any = None,
                   where: Callable | None = None) -> optax.GradientTransformationExtraArgs:
    """Progressive Gradient Flow for N:M training.

    Args:
      inner: the optimizer (default identity).
      n, m: the final N:M pattern.
      decay: ``"linear"`` or ``"exponential"`` (mask strength 1 -> 0 between
        ``begin_step`` and ``end_step``; ``rate`` sets the exponential's speed), or
        ``"stepwise"`` (hard masks following ``patterns`` at ``boundaries``).
      patterns: for ``"stepwise"``: N:M pairs in order, ending with ``(n, m)``;
        default ``[(m, m), (7m/8, m), (m/2, m), (n, m)]`` reduced to distinct
        entries (for 2:8: dense -> 7:8 -> 4:8 -> 2:8).
      boundaries: for ``"stepwise"``: the steps where each next pattern starts
        (one fewer than patterns); default evenly spaced over [begin, end].
      srste_decay: optional SR-STE decay term added on top.
      layouts, where: which leaves are masked.
    """
    _check_nm(n, m, "progressive_nm")
    if decay in ("linear", "exponential"):
        strength = (linear_decay(begin_step, end_step) if decay == "linear"
                    else exponential_decay(begin_step, end_step, rate))
        return _nm_transform(inner, [(n, m)], lambda t: 0, strength, srste_decay, layouts,
                             where, "progressive_nm")
    if decay != "stepwise":
        raise ValueError(f"decay must be 'linear', 'exponential' or 'stepwise', got {decay!r}")
    if patterns is None:
        patterns = []
        for p in [(m, m), (7 * m // 8, m), (m // 2, m), (n, m)]:
            if p not in patterns and p[0] >= n and p[0] > 0:
                patterns.append(p)
    patterns = [tuple(p) for p in patterns]
    for p in patterns:
        if len(p) != 2:
            raise ValueError(f"progressive_nm: patterns must be (n, m) pairs, got {p!r}")
        _check_nm(p[0], p[1], "progressive_nm patterns")
    if patterns[-1] != (n, m):
        raise ValueError(f"progressive_nm: patterns must end with ({n}, {m}), got {patterns[-1]}")
    if boundaries is None:
        count = len(patterns) - 1
        boundaries = [begin_step + round(j * (end_step - begin_step) / max(count - 1, 1))
                      for j in range(count)] if count > 1 else [begin_step] * count
    boundaries = [int(b) for b in boundaries]
    if len(boundaries) != len(patterns) - 1:
        raise ValueError(f"progressive_nm: boundaries needs {len(patterns) - 1} steps for "
                         f"{len(patterns)} patterns, got {len(boundaries)}")
    if any(b1 < b0 for b0, b1 in zip(boundaries, boundaries[1:])):
        raise ValueError(f"progressive_nm: boundaries must not decrease, got {boundaries}")
    bounds = jnp.asarray(boundaries, jnp.int32)

    def stage(t):
        return jnp.sum(jnp.asarray(t) >= bounds).astype(jnp.int32)

    return _nm_transform(inner, patterns, stage, lambda t: 0.0, srste_decay, layouts, where,
                         "progressive_nm")
