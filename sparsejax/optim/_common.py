"""Plumbing shared by the mask-owning transforms (not public)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sparsejax import paths
from sparsejax.layout import WeightLayout
from sparsejax.optim import masking


@dataclasses.dataclass(frozen=True)
class Targets:
    """The masked leaves of a params tree: indices into its flat leaves, and layouts."""

    treedef: Any
    index: tuple[int, ...]
    layouts: tuple[WeightLayout, ...]
    paths: tuple[str, ...]

    def take(self, leaves: list) -> list:
        return [leaves[i] for i in self.index]

    def tree(self, values: list, fill: Any = None) -> Any:
        """A params-structured tree holding ``values`` at masked leaves and ``fill`` elsewhere."""
        flat = [fill] * self.treedef.num_leaves
        for i, v in zip(self.index, values):
            flat[i] = v
        return jax.tree_util.tree_unflatten(self.treedef, flat)

    def masks_of(self, masks_tree: Any) -> list:
        flat = self.treedef.flatten_up_to(masks_tree)
        return self.take(flat)


def resolve_targets(params: Any, layouts: Any, where: Callable | None) -> Targets:
    treedef = jax.tree_util.tree_structure(params)
    lays = masking.layout_leaves(params, masking.mask_layouts(params, layouts, where))
    index = tuple(i for i, l in enumerate(lays) if l is not None)
    all_paths = paths.leaf_paths(params)
    return Targets(treedef, index, tuple(lays[i] for i in index), tuple(all_paths[i] for i in index))


def starting_masks(targets: Targets, params: Any, initial_masks: Any = None) -> list:
    """The masked leaves' starting masks: ``initial_masks`` checked, or all kept when None."""
    if initial_masks is not None:
        return check_initial_masks(targets, params, initial_masks)
    leaves = targets.treedef.flatten_up_to(params)
    return [jnp.ones(leaves[i].shape, bool) for i in targets.index]


def check_initial_masks(targets: Targets, params: Any, initial_masks: Any) -> list:
    """Validates user masks (e.g. from ``sfn.init``) and returns them for the masked leaves."""
    try:
        flat = targets.treedef.flatten_up_to(initial_masks)
    except (ValueError, TypeError) as e:
        raise ValueError(f"initial_masks must have the params' structure: {e}") from None
    leaves = targets.treedef.flatten_up_to(params)
    out = []
    for i, path in zip(targets.index, targets.paths):
        m = flat[i]
        if m is None:
            out.append(jnp.ones(leaves[i].shape, bool))
            continue
        if tuple(m.shape) != tuple(leaves[i].shape):
            raise ValueError(f"initial_masks[{path}]: shape {tuple(m.shape)} does not match the "
                             f"parameter's shape {tuple(leaves[i].shape)}")
        out.append(jnp.asarray(m, bool))
    for i, m in enumerate(flat):
        if m is not None and i not in targets.index:
            raise ValueError(f"initial_masks has a mask for {paths.leaf_paths(params)[i]}, which "
                             f"is not a masked leaf (see layouts / where)")
    return out


def with_extra_args(inner: optax.GradientTransformation | None):
    return optax.with_extra_args_support(inner if inner is not None else optax.identity())


class InnerStep(NamedTuple):
    """What a mask-owning transform's update starts from (see :func:`inner_step`)."""

    targets: Targets
    old_masks: list        # the current masks of the masked leaves
    inner_updates: Any     # the inner optimizer's updates (of the masked gradients)
    inner_state: Any
    weights: list          # the masked leaves' weights before this step
    candidate: list        # the masked leaves' weights after this step (pruned ones at 0)


def inner_step(name: str, inner, updates: Any, state: Any, params: Any, extra_args: dict, *,
               layouts: Any, where: Callable | None, zero_pruned: bool,
               steps_are_updates: bool) -> InnerStep:
    """The update prelude shared by :func:`~sparsejax.optim.prune` and SET/RigL.

    Finds the masked leaves, hands ``inner`` the gradients masked by the current masks
    (the raw ones with ``zero_pruned=False``) and computes the weights this step would
    give, the candidates that new masks are scored on. ``steps_are_updates`` is False
    when there is no inner optimizer: the updates are then gradients, not steps, and
    the candidates are the weights as they are.
    """
    if params is None:
        raise ValueError(f"{name} needs params: call update(grads, state, params)")
    targets = resolve_targets(params, layouts, where)
    old = targets.masks_of(state.masks)
    inner_grads = masked_grads(targets, updates, old) if zero_pruned else updates
    inner_updates, inner_state = inner.update(inner_grads, state.inner_state, params, **extra_args)
    p = targets.treedef.flatten_up_to(params)
    u = targets.treedef.flatten_up_to(inner_updates)
    weights = [p[i] for i in targets.index]
    candidate = [p[i] + u[i] if steps_are_updates else p[i] for i in targets.index]
    if zero_pruned:
        candidate = [jnp.where(m, c, jnp.zeros_like(c)) for m, c in zip(old, candidate)]
    return InnerStep(targets, old, inner_updates, inner_state, weights, candidate)


def masked_grads(targets: Targets, grads: Any, masks: list) -> Any:
    flat = targets.treedef.flatten_up_to(grads)
    for i, m in zip(targets.index, masks):
        flat[i] = jnp.where(m, flat[i], jnp.zeros_like(flat[i]))
    return jax.tree_util.tree_unflatten(targets.treedef, flat)


def land_on_masks(targets: Targets, updates: Any, params: Any, masks: list,
                  zeroed: list | None = None, as_steps: bool = True) -> Any:
    """Updates that put pruned weights (and ``zeroed`` ones, e.g. regrown) exactly at 0.

    With ``as_steps=False`` the updates are gradients for a later optimizer: their
    pruned entries are zeroed instead.
    """
    u = targets.treedef.flatten_up_to(updates)
    p = targets.treedef.flatten_up_to(params)
    for j, (i, m) in enumerate(zip(targets.index, masks)):
        to_zero = ~m if zeroed is None else (~m | zeroed[j])
        target = -p[i] if as_steps else jnp.zeros_like(u[i])
        u[i] = jnp.where(to_zero, target, u[i]).astype(u[i].dtype)
    return jax.tree_util.tree_unflatten(targets.treedef, u)


def zero_moments(targets: Targets, params: Any, inner_state: Any, keep: list) -> Any:
    """Zeroes entries where ``keep`` is False in every params-shaped tree of ``inner_state``.

    A params-shaped tree is any sub-tree with the params' structure and leaf
    shapes (Adam's mu and nu, SGD's trace, ...); scalars such as step counts are
    left alone.
    """
    shapes = [tuple(getattr(x, "shape", ())) for x in targets.treedef.flatten_up_to(params)]

    def params_shaped(node) -> bool:
        leaves, treedef = jax.tree_util.tree_flatten(node)
        return treedef == targets.treedef and \
            [tuple(getattr(x, "shape", ())) for x in leaves] == shapes

    def visit(node):
        if node is None:
            return node
        if params_shaped(node):
            flat = targets.treedef.flatten_up_to(node)
            for i, k in zip(targets.index, keep):
                flat[i] = jnp.where(k, flat[i], jnp.zeros_like(flat[i]))
            return jax.tree_util.tree_unflatten(targets.treedef, flat)
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            return type(node)(*[visit(c) for c in node])
        if isinstance(node, (tuple, list)):
            return type(node)(visit(c) for c in node)
        if isinstance(node, dict):
            return {k: visit(v) for k, v in node.items()}
        return node

    return visit(inner_state)


def select_tree(pred, on_true: Any, on_false: Any) -> Any:
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def add_trees(a: Any, b: Any) -> Any:
    return jax.tree.map(lambda x, y: x + y.astype(x.dtype), a, b)
