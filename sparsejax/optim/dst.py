"""Dynamic sparse training: SET and RigL.

Both keep a fixed number of active weights per matrix and, every
``update_every`` steps until ``end_step``, move a fraction of them: drop the
active weights of smallest magnitude (after this step's update), then grow as
many among the inactive ones, at random (SET, Mocanu et al., 2018) or where the
gradient is largest (RigL, Evci et al., 2020). The fraction follows RigL's
cosine annealing ``alpha/2 * (1 + cos(pi * t / end_step))``. Grown weights start
at 0 and all their moments in the inner optimizer (Adam's mu and nu, SGD's
trace) restart at 0, as in the published algorithms (RigL's reference code and
JaxPruner reset the optimizer state of regrown weights).

A variant that started grown weights' second moments (Adam's nu) at the mean over the
layer's kept weights, to avoid the large first steps that Adam's global-step bias
correction gives a nu restarted at 0, trained worse on held-out loss (digits MLP and
the LM quality table; benchmarks/results/sparse_training.md) and was removed.

Gradients: the transform wraps the optimizer and reads the raw gradients from
its ``updates`` argument (or from an explicit ``dense_grads=`` extra argument,
which wins). RigL needs the gradient at *inactive* weights, i.e. the gradient
with respect to the masked weight ``w * m``: train with a straight-through mask
(``Prune(..., gradient="ste")`` in the sparsify recipe, or
``sparsejax.masks.apply_mask(w, m, "ste")``) or pass ``dense_grads``. With
``zero_pruned=True`` the inner optimizer only ever sees the active entries.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sparsejax import masks as mask_math
from sparsejax.optim import _common, allocation
from sparsejax.optim.masking import mask_state
from sparsejax.optim.schedules import check_sparsity_arg, cosine_drop_fraction

__all__ = ["DynamicSparseState", "dynamic_sparse", "sparse_evolutionary_training", "rigl",
           "random_masks"]


@mask_state
class DynamicSparseState(NamedTuple):
    """State of SET / RigL: step, current masks, the inner optimizer's state, a PRNG key."""

    step: jax.Array
    masks: Any
    inner_state: Any
    rng: jax.Array


def random_masks(params: Any, sparsity: float, *, distribution: str = "erk", layouts: Any = None,
                 where: Callable | None = None, seed: int = 0) -> Any:
    """Random masks at ``sparsity`` spread by ``"uniform"`` or ``"erk"`` (static random baseline)."""
    check_sparsity_arg(sparsity, "sparsity")
    if distribution not in ("uniform", "erk"):
        raise ValueError(f"distribution must be 'uniform' or 'erk', got {distribution!r}")
    targets = _common.resolve_targets(params, layouts, where)
    leaves = targets.treedef.flatten_up_to(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), max(len(targets.index), 1))
    scores = [jax.random.uniform(k, leaves[i].shape) for k, i in zip(keys, targets.index)]
    return targets.tree(allocation.masks_from_scores(scores, targets.layouts, sparsity, distribution))


def _flat(lay, x):
    mat = lay.to_matrix(x)
    return mat.reshape(*mat.shape[:-2], mat.shape[-2] * mat.shape[-1])


def _unflat(lay, x):
    return lay.from_matrix(x.reshape(lay.matrix_shape))


def drop_and_grow(mask, weight, grow_score, fraction, lay):
    """One SET/RigL move on one leaf: returns (new mask, newly grown)."""
    m = _flat(lay, mask)
    w = _flat(lay, jnp.abs(weight.astype(jnp.float32)))
    g = _flat(lay, grow_score.astype(jnp.float32))
    n_active = jnp.sum(m, axis=-1, keepdims=True)
    n_drop = jnp.round(fraction * n_active).astype(n_active.dtype)
    keep = mask_math.topk_mask(jnp.where(m, w, -jnp.inf), n_active - n_drop) & m
    grown = mask_math.topk_mask(jnp.where(keep, -jnp.inf, g), n_drop)
    new = keep | grown
    return _unflat(lay, new), _unflat(lay, new & ~m)


def dynamic_sparse(inner: optax.GradientTransformation | None, sparsity: float, *,
                   grow: str, end_step: int, update_every: int = 100, drop_fraction: float = 0.3,
                   distribution: str = "erk", layouts: Any = None, where: Callable | None = None,
                   initial_masks: Any = None, zero_pruned: bool = True,
                   seed: int = 0) -> optax.GradientTransformationExtraArgs:
    """Dynamic sparse training around ``inner``; ``grow`` is ``"random"`` (SET) or ``"gradient"`` (RigL).

    Args:
      inner: the optimizer (default identity).
      sparsity: fraction of masked weights that are zero, in [0, 1).
      grow: ``"random"`` or ``"gradient"``.
      end_step: last step with topology updates (RigL's T_end, often 75% of training).
      update_every: steps between topology updates (delta T).
      drop_fraction: initial fraction alpha of active weights moved per update.
      distribution: ``"erk"`` or ``"uniform"`` for the initial random masks.
      layouts, where: which leaves are masked (see :func:`sparsejax.optim.prune`).
      initial_masks: starting masks (their sparsity is kept); default random.
      zero_pruned: land inactive weights on 0 and zero their moments.
      seed: PRNG seed for initial masks and random growth.
    """
    check_sparsity_arg(sparsity, "sparsity")
    if grow not in ("random", "gradient"):
        raise ValueError(f"grow must be 'random' or 'gradient', got {grow!r}")
    if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
        raise ValueError(f"update_every must be a positive int, got {update_every!r}")
    drop_schedule = cosine_drop_fraction(drop_fraction, end_step)
    # with no inner optimizer the updates are gradients, not steps: drop by the weights as they are
    steps_are_updates = inner is not None
    inner = _common.with_extra_args(inner)

    def init_fn(params):
        targets = _common.resolve_targets(params, layouts, where)
        if initial_masks is not None:
            masks = targets.tree(_common.check_initial_masks(targets, params, initial_masks))
        else:
            masks = random_masks(params, sparsity, distribution=distribution, layouts=layouts,
                                 where=where, seed=seed)
        return DynamicSparseState(jnp.zeros([], jnp.int32), masks, inner.init(params),
                                  jax.random.PRNGKey(seed + 1))

    def update_fn(updates, state, params=None, **extra_args):
        dense_grads = extra_args.pop("dense_grads", None)
        grads_for_growth = updates if dense_grads is None else dense_grads
        prelude = _common.inner_step("rigl" if grow == "gradient" else "SET", inner, updates,
                                     state, params, extra_args, layouts=layouts, where=where,
                                     zero_pruned=zero_pruned, steps_are_updates=steps_are_updates)
        targets, old, inner_updates, inner_state, candidate = (
            prelude.targets, prelude.old_masks, prelude.inner_updates, prelude.inner_state,
            prelude.candidate)
        g = targets.take(targets.treedef.flatten_up_to(grads_for_growth))
        rng, key = jax.random.split(state.rng)
        step = state.step
        do_update = (step > 0) & (step % update_every == 0) & (step < end_step)
        fraction = drop_schedule(step)

        def move():
            if grow == "gradient":
                scores = [jnp.abs(x.astype(jnp.float32)) for x in g]
            else:
                keys = jax.random.split(key, max(len(old), 1))
                scores = [jax.random.uniform(k, m.shape) for k, m in zip(keys, old)]
            out = [drop_and_grow(m, c, s, fraction, lay)
                   for m, c, s, lay in zip(old, candidate, scores, targets.layouts)]
            return [o[0] for o in out], [o[1] for o in out]

        def stay():
            return list(old), [jnp.zeros_like(m) for m in old]

        masks, grown = jax.lax.cond(do_update, move, stay) if targets.index else ([], [])
        if zero_pruned:
            out = _common.land_on_masks(targets, inner_updates, params, masks, zeroed=grown,
                                        as_steps=steps_are_updates)
            keep_moments = [m & ~gr for m, gr in zip(masks, grown)]
        else:
            out = _common.land_on_masks(targets, inner_updates, params,
                                        [jnp.ones_like(m) for m in masks], zeroed=grown,
                                        as_steps=steps_are_updates)
            keep_moments = [~gr for gr in grown]
        inner_state = _common.zero_moments(targets, params, inner_state, keep_moments)
        return out, DynamicSparseState(step + 1, targets.tree(masks), inner_state, rng)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def sparse_evolutionary_training(inner: optax.GradientTransformation | None, sparsity: float,
                                 **kwargs) -> optax.GradientTransformationExtraArgs:
    """SET: drop by magnitude, grow at random. Keyword arguments as :func:`dynamic_sparse`."""
    return dynamic_sparse(inner, sparsity, grow="random", **kwargs)


def rigl(inner: optax.GradientTransformation | None, sparsity: float,
         **kwargs) -> optax.GradientTransformationExtraArgs:
    """RigL: drop by magnitude, grow where ``|gradient|`` is largest. Keyword arguments as :func:`dynamic_sparse`."""
    return dynamic_sparse(inner, sparsity, grow="gradient", **kwargs)
