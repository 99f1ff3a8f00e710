"""Pruning during training: one-shot, gradual (GMP) and iterative with rewinding.

:func:`prune` wraps any optax optimizer. It receives the raw gradients as its
``updates`` argument (so gradient-based scores see gradients, not the inner
optimizer's output), hands the inner optimizer masked gradients, and at the
steps its :class:`~sparsejax.optim.schedules.SparsitySchedule` names recomputes
the masks from scores of the updated weights. With ``zero_pruned=True`` (the
default) the returned updates land every pruned weight exactly on 0 and the
pruned entries of the inner optimizer's moments are zeroed, so pruned weights
stay zero for good and masks are nested (a pruned weight never returns).

Scores:
  * ``"magnitude"``: ``|w|`` of the updated weights.
  * ``"random"``: uniform noise (a static random mask when used one-shot).
  * ``"saliency"``: ``|w * g|`` (first-order Taylor / SNIP-style).
  * ``"movement"``: ``-sum_t w_t * g_t`` accumulated since init (Sanh et al., 2020):
    weights moving away from zero score high.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sparsejax.optim import _common, allocation, schedules
from sparsejax.optim.masking import mask_state
from sparsejax.optim.schedules import SparsitySchedule

__all__ = ["PruneState", "magnitude_masks", "prune", "SCORES"]


class ScoreInputs(NamedTuple):
    """What a score function sees at a mask update, one entry per masked leaf (float32)."""

    candidate: list   # the weights after this step's update (pruned ones at 0)
    weights: list     # the weights before it
    grads: list       # the raw gradients
    movement: list    # accumulated movement scores (score="movement" only)
    key: jax.Array    # a fresh PRNG key


def _magnitude(x: ScoreInputs) -> list:
    return [jnp.abs(c) for c in x.candidate]


def _random(x: ScoreInputs) -> list:
    keys = jax.random.split(x.key, len(x.candidate))
    return [jax.random.uniform(k, c.shape) for k, c in zip(keys, x.candidate)]


def _saliency(x: ScoreInputs) -> list:
    return [jnp.abs(w * g) for w, g in zip(x.weights, x.grads)]


def _movement(x: ScoreInputs) -> list:
    return list(x.movement)


# score name -> scores of the masked leaves (higher is kept).
SCORES: dict[str, Callable[[ScoreInputs], list]] = {
    "magnitude": _magnitude, "random": _random, "saliency": _saliency, "movement": _movement,
}


@mask_state
class PruneState(NamedTuple):
    """State of :func:`prune`.

    Attributes:
      step: updates applied so far.
      masks: current masks (params structure; bool where masked, None elsewhere).
      inner_state: the wrapped optimizer's state.
      rng: key for random scores.
      movement: accumulated movement scores at masked leaves (None elsewhere, and
        everywhere unless ``score="movement"``).
      rewind_params: weights saved at ``rewind_step`` (None unless rewinding).
    """

    step: jax.Array
    masks: Any
    inner_state: Any
    rng: jax.Array
    movement: Any
    rewind_params: Any


def magnitude_masks(params: Any, sparsity: float, *, masks: Any = None,
                    distribution: str = "global", min_kept: int = 1, layouts: Any = None,
                    where: Callable | None = None) -> Any:
    """Masks keeping the largest ``|w|`` of the masked leaves: one prune step of IMP.

    Nested within ``masks`` (what is pruned there stays pruned), so a sequence of
    calls at rising sparsity is iterative magnitude pruning's masks. ``layouts``,
    ``where``, ``distribution`` and ``min_kept`` mean what they mean in :func:`prune`.
    """
    schedules.check_sparsity_arg(sparsity, "sparsity")
    allocation.check_distribution(distribution)
    targets = _common.resolve_targets(params, layouts, where)
    leaves = targets.treedef.flatten_up_to(params)
    old = _common.starting_masks(targets, params, masks)
    scores = [jnp.where(m, jnp.abs(leaves[i].astype(jnp.float32)), -jnp.inf)
              for i, m in zip(targets.index, old)]
    new = allocation.masks_from_scores(scores, targets.layouts, sparsity, distribution, min_kept)
    return targets.tree([n & m for n, m in zip(new, old)])


def prune(inner: optax.GradientTransformation | None = None,
          schedule: SparsitySchedule | None = None, *,
          score: str = "magnitude", distribution: str = "uniform", min_kept: int = 1,
          layouts: Any = None, where: Callable | None = None, initial_masks: Any = None,
          zero_pruned: bool = True, rewind_step: int | None = None,
          seed: int = 0) -> optax.GradientTransformationExtraArgs:
    """Prunes masked leaves to ``schedule``'s sparsity while ``inner`` trains them.

    Args:
      inner: the optimizer that turns (masked) gradients into updates; ``None`` is the
        identity (then this transform sees and returns gradients). First, as in optax's
        wrappers; the older order ``prune(schedule, inner)`` still works, with a
        DeprecationWarning.
      schedule: :func:`~sparsejax.optim.one_shot`, :func:`~sparsejax.optim.gradual`
        or :func:`~sparsejax.optim.iterative`.
      score: one of ``SCORES``.
      distribution: ``"uniform"``, ``"erk"`` or ``"global"`` (see
        :mod:`sparsejax.optim.allocation`).
      min_kept: weights kept per matrix under ``"global"``.
      layouts: pytree of ``WeightLayout``/None (e.g. ``sfn.layouts``); leaves of
        ndim >= 2 default to the Flax layout, ndim < 2 are never masked.
      where: ``(path, leaf) -> bool`` restricting which leaves are masked.
      initial_masks: starting masks (e.g. from ``sfn.init``); default all kept.
      zero_pruned: land pruned weights on 0 and zero their moments. ``False``
        trains the dense weights straight through (the forward pass masks them)
        and lets pruned weights come back at the next mask update.
      rewind_step: if set, the weights at this step are saved, and at every later
        mask update the survivors are rewound to them (lottery-ticket rewinding);
        the inner optimizer's state restarts from ``inner.init``.
      seed: PRNG seed for random scores.
    """
    if isinstance(inner, SparsitySchedule) and not isinstance(schedule, SparsitySchedule):
        warnings.warn("prune(schedule, inner) is deprecated: the optimizer comes first, as in "
                      "optax's wrappers: prune(inner, schedule)", DeprecationWarning, stacklevel=2)
        inner, schedule = schedule, inner
    if not isinstance(schedule, SparsitySchedule):
        raise TypeError(f"schedule must be a SparsitySchedule (one_shot, gradual, iterative), "
                        f"got {type(schedule).__name__}: call prune(inner, schedule)")
    if score not in SCORES:
        raise ValueError(f"score must be one of {tuple(SCORES)}, got {score!r}")
    allocation.check_distribution(distribution)
    if rewind_step is not None and (isinstance(rewind_step, bool) or not isinstance(rewind_step, int)
                                    or rewind_step < 0):
        raise ValueError(f"rewind_step must be a non-negative int or None, got {rewind_step!r}")
    if isinstance(min_kept, bool) or not isinstance(min_kept, int) or min_kept < 1:
        raise ValueError(f"min_kept must be a positive int, got {min_kept!r}")
    score_fn = SCORES[score]
    # with no inner optimizer the updates are gradients, not steps: score the weights as they are
    steps_are_updates = inner is not None
    inner = _common.with_extra_args(inner)

    def init_fn(params):
        targets = _common.resolve_targets(params, layouts, where)
        leaves = targets.treedef.flatten_up_to(params)
        masks = _common.starting_masks(targets, params, initial_masks)
        movement = None
        if score == "movement":
            movement = targets.tree([jnp.zeros(leaves[i].shape, jnp.float32) for i in targets.index])
        rewind = None if rewind_step is None else jax.tree.map(jnp.array, params)
        return PruneState(step=jnp.zeros([], jnp.int32), masks=targets.tree(masks),
                          inner_state=inner.init(params), rng=jax.random.PRNGKey(seed),
                          movement=movement, rewind_params=rewind)

    def update_fn(updates, state, params=None, **extra_args):
        step = _common.inner_step("prune", inner, updates, state, params, extra_args,
                                  layouts=layouts, where=where, zero_pruned=zero_pruned,
                                  steps_are_updates=steps_are_updates)
        targets, old, inner_updates, inner_state = (step.targets, step.old_masks,
                                                    step.inner_updates, step.inner_state)
        weights = [w.astype(jnp.float32) for w in step.weights]
        grads = [g.astype(jnp.float32) for g in targets.take(targets.treedef.flatten_up_to(updates))]
        movement = state.movement
        if score == "movement":   # -sum_t w_t * g_t, accumulated every step
            movement = targets.tree([a - w * g for a, w, g in
                                     zip(targets.masks_of(movement), weights, grads)])
        rng, key = jax.random.split(state.rng)
        do_update = schedule.is_update(state.step)

        def new_masks():
            scores = score_fn(ScoreInputs(
                [c.astype(jnp.float32) for c in step.candidate], weights, grads,
                targets.masks_of(movement) if score == "movement" else [], key))
            if zero_pruned:  # nested masks: what is pruned stays pruned
                scores = [jnp.where(m, s, -jnp.inf) for m, s in zip(old, scores)]
            return allocation.masks_from_scores(scores, targets.layouts,
                                                schedule.sparsity(state.step),
                                                distribution, min_kept)

        masks = jax.lax.cond(do_update, new_masks, lambda: list(old)) if targets.index else []

        rewind_params = state.rewind_params
        if rewind_step is not None:
            rewind_params = _common.select_tree(state.step == rewind_step, params, rewind_params)
            rewinding = do_update & (state.step > rewind_step)
            rewound = jax.tree.map(lambda r, p: (r - p), rewind_params, params)
            inner_updates = _common.select_tree(rewinding, rewound, inner_updates)
            inner_state = _common.select_tree(rewinding, inner.init(params), inner_state)

        out = inner_updates
        if zero_pruned:
            out = _common.land_on_masks(targets, inner_updates, params, masks,
                                        as_steps=steps_are_updates)
            inner_state = _common.zero_moments(targets, params, inner_state, masks)
        return out, PruneState(step=state.step + 1, masks=targets.tree(masks),
                               inner_state=inner_state, rng=rng, movement=movement,
                               rewind_params=rewind_params)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
