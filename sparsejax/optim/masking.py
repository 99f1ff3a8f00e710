"""Masks as pytrees, and where the optimizers keep them.

Convention (shared with :func:`sparsejax.sparsify`): a *masks* pytree has the
params' structure and holds a boolean array of the leaf's shape where the leaf is
masked and ``None`` where it is not. ``jax.tree.map(f, params, masks)`` then hands
``f`` a ``None`` for unmasked leaves. ``sparsify``'s state is ``{"masks": masks}``.

Masks have one owner at a time. Fixed masks (a recipe's rules, computed by
``sfn.init``) are owned by ``sparsify`` and live in ``sstate["masks"]``. Moving
masks (GMP and other :func:`prune` schedules, SET, RigL, SR-STE, Progressive
Gradient Flow) are owned by the optimizer transform that updates them, in its own
optax state (a NamedTuple with a ``masks`` field, marked by :func:`mask_state`);
such a transform takes ``sstate["masks"]`` once at init (``initial_masks=``) and
from then on ``sstate``'s copy is stale. :func:`forward_masks` is the one hand-over:
the masks the forward pass reads at this step, from whichever owner holds them.
:func:`current_masks` inspects the optimizer's own masks.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import paths
from sparsejax.layout import WeightLayout

__all__ = [
    "mask_layouts",
    "apply_masks",
    "current_masks",
    "forward_masks",
    "owns_masks",
    "soft_masks",
    "sparsity_of",
    "masked_sparsity",
]

WherePredicate = Callable[[str, Any], bool]


def _is_array(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _leaves_up_to(params: Any, tree: Any, name: str) -> list:
    """``tree`` flattened up to ``params``' leaves (``None`` stays a leaf)."""
    treedef = jax.tree_util.tree_structure(params)
    if tree is None:
        return [None] * treedef.num_leaves
    try:
        return treedef.flatten_up_to(tree)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{name} must have the params' structure: {e}") from None


def mask_layouts(params: Any, layouts: Any = None,
                 where: WherePredicate | None = None) -> Any:
    """Which leaves are masked, and their matrix layout.

    Returns a pytree with the params' structure holding a :class:`WeightLayout`
    for each masked leaf and ``None`` elsewhere. A leaf is masked when it has a
    layout in ``layouts`` (e.g. ``sfn.layouts``) or, where ``layouts`` is None or
    has None there, when it has ``ndim >= 2`` (then ``WeightLayout.default``);
    biases and norms (``ndim < 2``) are never masked. ``where(path, leaf)``
    restricts further.
    """
    with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    given = _leaves_up_to(params, layouts, "layouts")
    out = []
    for (kp, leaf), lay in zip(with_path, given):
        path = paths.path_str(kp)
        shape = tuple(getattr(leaf, "shape", ()))
        if lay is not None and not isinstance(lay, WeightLayout):
            raise TypeError(f"layouts[{path}]: expected a WeightLayout or None, got {type(lay).__name__}")
        if lay is not None and tuple(lay.shape) != shape:
            raise ValueError(f"layouts[{path}]: layout shape {lay.shape} does not match the "
                             f"parameter's shape {shape}")
        if lay is None and len(shape) >= 2:
            lay = WeightLayout.default(shape)
        if lay is not None and where is not None and not where(path, leaf):
            lay = None
        out.append(lay)
    return jax.tree_util.tree_unflatten(treedef, out)


def layout_leaves(params: Any, layouts_tree: Any) -> list:
    """Resolved layouts (from :func:`mask_layouts`) as a flat list aligned with params."""
    return _leaves_up_to(params, layouts_tree, "layouts")


def apply_masks(params: Any, masks: Any) -> Any:
    """``params`` with masked entries set to zero (unmasked leaves unchanged)."""
    return jax.tree.map(lambda p, m: p if m is None else jnp.where(m, p, jnp.zeros_like(p)),
                        params, masks)


def sparsity_of(params: Any, masks: Any = None) -> dict[str, float]:
    """Fraction of zeros in each masked leaf (or each leaf of ndim >= 2 if ``masks`` is None)."""
    out = {}
    ms = _leaves_up_to(params, masks, "masks")
    for path, p, m in zip(paths.leaf_paths(params), jax.tree.leaves(params), ms):
        if (masks is None and p.ndim >= 2) or m is not None:
            out[path] = float(np.mean(np.asarray(p) == 0))
    return out


def masked_sparsity(masks: Any, *, by_path: bool = False) -> Any:
    """Fraction of masked-out weights: the one measure of a masks pytree's sparsity.

    ``masks`` holds a boolean (or, for soft masks, a [0, 1] float) array where a leaf is
    masked and ``None`` elsewhere. By default: the masked-out fraction over all masked
    leaves, a float32 scalar that works under ``jit`` (train steps log it), or ``None`` when
    no leaf is masked (nothing to show for a dense run). With ``by_path=True``: a dict of
    host floats, one per masked leaf, keyed by parameter path (summaries). Soft masks count
    ``1 - value``; results are clipped to [0, 1], so rounding never shows ``-0.000``.
    """
    if by_path:
        with_path, _ = jax.tree_util.tree_flatten_with_path(masks)
        return {paths.path_str(kp): float(masked_sparsity(np.asarray(jax.device_get(m)))) + 0.0
                for kp, m in with_path}
    leaves = [m for m in jax.tree.leaves(masks) if m is not None]
    if not leaves:
        return None
    total = sum(int(np.size(m)) for m in leaves)
    if not total:
        return jnp.zeros([], jnp.float32)
    kept = sum(jnp.sum(m, dtype=jnp.float32) for m in leaves)
    return jnp.clip(1.0 - kept / total, 0.0, 1.0)


def _children(state: Any) -> list:
    if isinstance(state, tuple):  # NamedTuples included
        return list(state)
    if isinstance(state, list):
        return state
    if isinstance(state, dict):
        return list(state.values())
    return []


def find_mask_states(opt_state: Any) -> list:
    """Every sparsejax mask-owning state (a NamedTuple with ``masks``) inside ``opt_state``."""
    found, stack = [], [opt_state]
    while stack:
        s = stack.pop(0)
        if isinstance(s, tuple) and hasattr(s, "_fields") and "masks" in s._fields \
                and getattr(type(s), "_sparsejax_mask_state", False):
            found.append(s)
            continue
        stack.extend(_children(s))
    return found


def current_masks(opt_state: Any) -> Any:
    """The masks pytree held by the one mask-owning transform inside ``opt_state``.

    Looks through ``optax.chain`` tuples, ``inject_hyperparams`` and ``MultiSteps``
    states (any nesting of tuples, lists, dicts and NamedTuples). Pass the result to
    a sparsified function as ``sfn(params, {"masks": masks}, x)``.
    """
    found = find_mask_states(opt_state)
    if not found:
        raise ValueError("opt_state holds no sparsejax mask state (prune, sparse_evolutionary_"
                         "training, rigl, srste or progressive_nm)")
    if len(found) > 1:
        raise ValueError(f"opt_state holds {len(found)} mask states; masks would be ambiguous")
    return found[0].masks


def owns_masks(opt_state: Any) -> bool:
    """Whether a transform inside ``opt_state`` owns (updates) the masks."""
    return bool(find_mask_states(opt_state))


def soft_masks(masks: Any, strength) -> Any:
    """``m + strength * (1 - m)`` at masked leaves: Progressive Gradient Flow's decaying mask.

    Float masks in [0, 1]: 1 where kept, ``strength`` where pruned (the hard mask at 0).
    """
    def soft(m):
        if m is None:
            return None
        mf = m.astype(jnp.float32)
        return mf + jnp.asarray(strength, jnp.float32) * (1.0 - mf)
    return jax.tree.map(soft, masks, is_leaf=lambda x: x is None)


def forward_masks(sstate: Any, opt_state: Any) -> Any:
    """The masks the forward pass reads at this step: the one hand-over between owners.

    Where a transform inside ``opt_state`` owns the masks (:func:`prune`, SET, RigL, the
    N:M transforms), its current masks; a state with a mask ``strength`` (the N:M
    transforms) hands over :func:`soft_masks` at that strength (Progressive Gradient
    Flow; hard 0/1 values at strength 0). Otherwise the fixed masks of
    ``sstate["masks"]``. Use it as ``sfn(params, {"masks": forward_masks(sstate,
    opt_state)}, x)``; it works under ``jit``.
    """
    found = find_mask_states(opt_state)
    if not found:
        return sstate["masks"]
    if len(found) > 1:
        raise ValueError(f"opt_state holds {len(found)} mask states; masks would be ambiguous")
    state = found[0]
    strength = getattr(state, "strength", None)
    return state.masks if strength is None else soft_masks(state.masks, strength)


def mask_state(cls):
    """Marks a NamedTuple state class as one that owns the current masks."""
    cls._sparsejax_mask_state = True
    return cls
