"""Sparse model soups: averaging models that share one sparsity mask.

A model soup (Wortsman et al., 2022) averages the parameters of models fine-tuned
from one starting point. Averaging *sparse* models keeps the sparsity only when
they share one mask: Sparse Model Soups (Zimmer, Spiegel & Pokutta, 2023) get
that by construction, retraining copies of one pruned model (different batch
orders, seeds or weight decay) with its mask fixed. The functions here are the
averaging half; :mod:`sparsejax.imp_soups` drives the prune-retrain-average
cycles.

* :func:`uniform_soup`: the mean of every ingredient.
* :func:`greedy_soup`: Wortsman et al.'s greedy recipe: ingredients sorted by
  held-out loss, each kept only if adding it does not raise the soup's held-out
  loss, so the soup is never worse on that set than the best ingredient.

Masks follow :mod:`sparsejax.optim.masking`'s convention (params-structured, a
boolean array at masked leaves, ``None`` elsewhere). Ingredients whose masks
differ are refused with the first differing parameter path: their average would
be denser than either. The soup is the average with the shared mask applied, so
every pruned entry is exactly zero even if an ingredient trained its pruned
weights straight through.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import paths

__all__ = ["GreedySoup", "check_same_masks", "greedy_soup", "uniform_soup"]


def _flat(tree: Any) -> tuple[list[str], list, Any]:
    with_path, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)
    return [paths.path_str(kp) for kp, _ in with_path], [x for _, x in with_path], treedef


def _first_difference(a: list[str], b: list[str]) -> str:
    for x, y in zip(a, b):
        if x != y:
            return x
    longer = a if len(a) > len(b) else b
    return longer[min(len(a), len(b))] if len(a) != len(b) else "(the tree nodes)"


def _check_count(ingredients: Sequence[Any], masks: Sequence[Any]) -> None:
    if isinstance(ingredients, dict) or not isinstance(ingredients, (list, tuple)) or not ingredients:
        raise ValueError("ingredients must be a non-empty list of params pytrees (one per model)")
    if isinstance(masks, dict) or not isinstance(masks, (list, tuple)) or len(masks) != len(ingredients):
        raise ValueError(f"masks must be a list with one masks pytree per ingredient "
                         f"({len(ingredients)}); pass [masks] * n when they share one")


def check_same_masks(masks: Sequence[Any]) -> None:
    """Raises a one-line ValueError naming the first parameter path where two masks differ."""
    if not isinstance(masks, (list, tuple)) or not masks:
        raise ValueError("masks must be a non-empty list of masks pytrees")
    for i, path, a, b in _leaf_pairs(masks, "masks of different structure"):
        if a is None and b is None:
            continue
        if (a is None) != (b is None):
            which = 0 if a is None else i
            raise ValueError(f"soup ingredients 0 and {i} have different masks at {path} "
                             f"(ingredient {which} leaves it unmasked): a soup averages copies "
                             "retrained from one pruned model; prune once, then retrain every "
                             "copy with that mask")
        a, b = np.asarray(a, bool), np.asarray(b, bool)
        if a.shape != b.shape or not np.array_equal(a, b):
            detail = (f"shapes {a.shape} and {b.shape}" if a.shape != b.shape
                      else f"{int(np.sum(a != b))} of {a.size} entries differ")
            raise ValueError(f"soup ingredients 0 and {i} have different masks at {path} "
                             f"({detail}): their average would be denser than either; prune "
                             "once, then retrain every copy with that mask")


def _leaf_pairs(trees: Sequence[Any], different: str):
    """``(i, path, leaf of tree 0, leaf of tree i)`` for every tree after the first, once its
    structure is checked to be tree 0's (else a one-line error: they "have ``different``")."""
    ref_paths, ref_leaves, ref_def = _flat(trees[0])
    for i, other in enumerate(trees[1:], start=1):
        other_paths, other_leaves, other_def = _flat(other)
        if other_def != ref_def:
            raise ValueError(f"soup ingredients 0 and {i} have {different} "
                             f"(first difference at {_first_difference(ref_paths, other_paths)}): "
                             "a soup averages copies of one model")
        for path, a, b in zip(ref_paths, ref_leaves, other_leaves):
            yield i, path, a, b


def _check_same_structure(ingredients: Sequence[Any]) -> None:
    for i, path, a, b in _leaf_pairs(ingredients, "different params structures"):
        if np.shape(a) != np.shape(b):
            raise ValueError(f"soup ingredients 0 and {i} differ in shape at {path}: "
                             f"{np.shape(a)} vs {np.shape(b)}")


def uniform_soup(ingredients: Sequence[Any], masks: Sequence[Any]) -> Any:
    """The mean of ``ingredients`` (params pytrees), zero wherever their shared mask prunes.

    Args:
      ingredients: params pytrees of one model (same structure and shapes).
      masks: one masks pytree per ingredient; they must be equal (see
        :func:`check_same_masks`), which is what makes the soup as sparse as each
        ingredient.

    Floating-point leaves are averaged in float32 and cast back to their dtype;
    other leaves (integer counters) are taken from the first ingredient.
    """
    _check_count(ingredients, masks)
    _check_same_structure(ingredients)
    check_same_masks(masks)
    n = len(ingredients)

    def mean(*leaves):
        first = jnp.asarray(leaves[0])
        if not jnp.issubdtype(first.dtype, jnp.inexact):
            return first
        total = sum(jnp.asarray(x, jnp.float32) for x in leaves)
        return (total / n).astype(first.dtype)

    soup = jax.tree.map(mean, *ingredients)
    return jax.tree.map(lambda p, m: p if m is None else jnp.where(jnp.asarray(m, bool), p,
                                                                    jnp.zeros_like(p)),
                        soup, masks[0], is_leaf=lambda x: x is None)


class GreedySoup(NamedTuple):
    """What :func:`greedy_soup` chose.

    Attributes:
      params: the soup.
      chosen: indices of the ingredients in it, in the order they were added.
      ingredient_losses: each ingredient's held-out loss (mask applied), by index.
      loss: the soup's held-out loss (never above ``min(ingredient_losses)``).
    """

    params: Any
    chosen: tuple[int, ...]
    ingredient_losses: tuple[float, ...]
    loss: float


def greedy_soup(ingredients: Sequence[Any], masks: Sequence[Any],
                held_out_loss: Callable[[Any], float],
                ingredient_losses: Sequence[float] | None = None) -> GreedySoup:
    """Wortsman et al.'s greedy soup over same-mask ingredients.

    Ingredients are sorted by ``held_out_loss`` (lowest first); the soup starts as
    the best one and each next ingredient joins if the uniform soup with it has a
    held-out loss no higher than without it. ``held_out_loss(params) -> float``
    should use data the ingredients were not trained on (it decides what is kept).
    ``ingredient_losses``: each ingredient's held-out loss with the mask applied, when
    the caller has it already (not evaluated again).
    """
    _check_count(ingredients, masks)
    _check_same_structure(ingredients)
    check_same_masks(masks)
    shared = masks[0]
    # Each ingredient is scored as the soup would hold it (mask applied), so the soup's
    # first state and the best ingredient's score are the same model.
    if ingredient_losses is not None:
        if len(ingredient_losses) != len(ingredients):
            raise ValueError(f"ingredient_losses has {len(ingredient_losses)} values for "
                             f"{len(ingredients)} ingredients")
        losses = tuple(float(x) for x in ingredient_losses)
    else:
        losses = tuple(float(held_out_loss(uniform_soup([p], [shared]))) for p in ingredients)
    order = sorted(range(len(ingredients)), key=lambda i: losses[i])
    chosen = [order[0]]
    soup, best = uniform_soup([ingredients[order[0]]], [shared]), losses[order[0]]
    for i in order[1:]:
        candidate = uniform_soup([ingredients[j] for j in chosen + [i]], [shared] * (len(chosen) + 1))
        loss = float(held_out_loss(candidate))
        if loss <= best:
            chosen.append(i)
            soup, best = candidate, loss
    return GreedySoup(soup, tuple(chosen), losses, best)
