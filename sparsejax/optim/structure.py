"""From group zeros to smaller shapes.

After a group-lasso run with :func:`~sparsejax.optim.channels` (or
:func:`~sparsejax.optim.attention_heads`, :func:`~sparsejax.optim.output_channels`,
:func:`~sparsejax.optim.input_neurons`) groups, :func:`remove_zero_groups`
slices every channel whose group is exactly zero out of all its member leaves,
so the returned params have smaller shapes and compute the same function (a
removed hidden neuron contributed nothing). Block and N:M groups do not shrink a
shape and are rejected.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np

from sparsejax import paths
from sparsejax.optim.groups import GroupSpec, resolve_groups

__all__ = ["remove_zero_groups"]


def remove_zero_groups(params: Any, groups: Sequence[GroupSpec] | GroupSpec,
                       tol: float = 0.0) -> tuple[Any, dict[str, int]]:
    """Removes channel groups whose weights are all ``<= tol`` in magnitude.

    Returns ``(smaller_params, kept)`` where ``kept`` maps each group spec's name
    to the number of channels it kept (at least one is kept per spec so no layer
    vanishes). Runs eagerly (shapes change), not under ``jit``.
    """
    specs = [groups] if isinstance(groups, GroupSpec) else list(groups)
    for spec in specs:
        if spec.kind not in ("channels", "per_leaf_axis"):
            raise ValueError(f"{spec.name}: only channel-like groups shrink shapes; block and N:M "
                             "groups cannot be removed")
        if spec.stack_axes:
            raise ValueError(f"{spec.name}: stacked layers keep different channels per layer, which "
                             "no single smaller stacked shape holds; unstack the layers first")
    leaves, treedef = jax.tree_util.tree_flatten(params)
    leaves = [np.asarray(x) for x in leaves]
    leaf_paths = paths.leaf_paths(params)
    cuts: dict[int, list[tuple[int, np.ndarray]]] = {}
    kept = {}
    for spec in specs:
        index = resolve_groups([spec], params)
        if spec.kind == "channels":
            units = [(members, offset, size) for members, offset, size in index.channel_members]
        else:
            units = []
            offset = 0
            for i, ids in enumerate(index.ids):
                if ids is not None:
                    size = leaves[i].shape[spec.axis]
                    units.append((((i, spec.axis),), offset, size))
                    offset += size
        total = 0
        for members, _, size in units:
            alive = np.zeros(size, bool)
            for i, axis in members:
                moved = np.moveaxis(np.abs(leaves[i]), axis, 0).reshape(size, -1)
                alive |= (moved > tol).any(axis=1)
            if not alive.any():
                alive[0] = True
            for i, axis in members:
                cuts.setdefault(i, []).append((axis % leaves[i].ndim, alive))
            total += int(alive.sum())
        kept[spec.name] = total
    out = []
    for i, x in enumerate(leaves):
        for axis, alive in cuts.get(i, []):
            if x.shape[axis] != alive.shape[0]:
                raise ValueError(f"parameter {leaf_paths[i]} is cut twice on axis {axis}")
            x = np.compress(alive, x, axis=axis)
        out.append(x)
    return jax.tree_util.tree_unflatten(treedef, out), kept
