"""Groups of weights for group-sparse regularisers, over Flax layouts.

A group spec says which weights belong together; :func:`resolve_groups` turns a
list of specs into integer group ids per leaf (numpy constants, computed from
shapes only, so they cost nothing under ``jit``). Kinds:

* :func:`output_channels`: for each matching leaf, one group per index of its
  last axis (a Dense kernel's column, a conv kernel's filter: all axes but -1).
* :func:`input_neurons`: one group per index of axis -2 (a Dense kernel's row).
* :func:`channels`: one group per index of a shared axis across *several*
  parameters, e.g. a hidden neuron = ``Dense_0/kernel[:, j]``, ``Dense_0/bias[j]``
  and ``Dense_1/kernel[j, :]``. This is what :func:`~sparsejax.optim.remove_zero_groups`
  can cut out.
* :func:`attention_heads`: head ``h`` across Flax ``MultiHeadDotProductAttention``'s
  query/key/value kernels ``(d, heads, head_dim)`` (axis -2) and out kernel
  ``(heads, head_dim, d)`` (axis 0).
* :func:`blocks`: ``(bk, bn)`` tiles of each matching leaf's ``(K, N)`` matrix.
* :func:`nm_groups`: every ``m`` consecutive entries along K of each column.

Patterns are leaf paths (``params/Dense_0/kernel``), globs or ``re:`` regexes
(see :mod:`sparsejax.paths`). A weight may belong to at most one group.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np

from sparsejax import paths
from sparsejax.layout import WeightLayout

__all__ = ["GroupSpec", "GroupIndex", "output_channels", "input_neurons", "channels",
           "attention_heads", "blocks", "nm_groups", "resolve_groups"]


@dataclasses.dataclass(frozen=True)
class GroupSpec:
    """One kind of group. Build with the constructors in this module."""

    kind: str  # "channels" | "per_leaf_axis" | "blocks" | "nm"
    members: tuple[tuple[str, int], ...] = ()
    pattern: str = ""
    axis: int = -1
    block: tuple[int, int] = (1, 1)
    m: int = 0
    name: str = ""


@dataclasses.dataclass(frozen=True)
class GroupIndex:
    """Group ids per leaf (``np.int32`` of the leaf's shape, -1 = no group; None if ungrouped)."""

    ids: tuple
    num_groups: int
    sizes: np.ndarray
    channel_members: tuple  # per group spec of kind channels: ((leaf index, axis), ...), first id


def output_channels(pattern: str = "*kernel") -> GroupSpec:
    """One group per output channel (index of the last axis) of each leaf matching ``pattern``."""
    return GroupSpec("per_leaf_axis", pattern=pattern, axis=-1, name=f"output_channels({pattern!r})")


def input_neurons(pattern: str = "*kernel") -> GroupSpec:
    """One group per input neuron (index of axis -2) of each leaf matching ``pattern``."""
    return GroupSpec("per_leaf_axis", pattern=pattern, axis=-2, name=f"input_neurons({pattern!r})")


def channels(*members: tuple[str, int]) -> GroupSpec:
    """One group per index of a channel shared by several leaves: ``(pattern, axis)`` pairs,
    each pattern matching exactly one leaf, all axes of the same size."""
    if not members:
        raise ValueError("channels needs at least one (pattern, axis) member")
    for mem in members:
        if not (isinstance(mem, tuple) and len(mem) == 2 and isinstance(mem[1], int)):
            raise ValueError(f"channels: members must be (pattern, axis) pairs, got {mem!r}")
    return GroupSpec("channels", members=tuple(members), name=f"channels{tuple(members)!r}")


def attention_heads(query: str, key: str, value: str, out: str) -> GroupSpec:
    """One group per attention head across Flax's q/k/v kernels (axis -2) and out kernel (axis 0)."""
    return channels((query, -2), (key, -2), (value, -2), (out, 0))


def blocks(pattern: str, block: tuple[int, int]) -> GroupSpec:
    """``(bk, bn)`` tiles of the ``(K, N)`` matrix (Flax layout) of each leaf matching ``pattern``."""
    if len(block) != 2 or any(not isinstance(b, int) or b < 1 for b in block):
        raise ValueError(f"blocks: block must be two positive ints, got {block!r}")
    return GroupSpec("blocks", pattern=pattern, block=tuple(block), name=f"blocks({pattern!r}, {block})")


def nm_groups(pattern: str, m: int) -> GroupSpec:
    """Groups of ``m`` consecutive entries along K, per column, of each leaf matching ``pattern``."""
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"nm_groups: m must be a positive int, got {m!r}")
    return GroupSpec("nm", pattern=pattern, m=m, name=f"nm_groups({pattern!r}, {m})")


def _axis_ids(shape, axis, offset):
    ids = np.arange(shape[axis], dtype=np.int32) + offset
    view = [1] * len(shape)
    view[axis] = shape[axis]
    return np.broadcast_to(ids.reshape(view), shape)


def _matrix_ids(shape, tile_ids_fn, offset):
    lay = WeightLayout.default(shape)
    k, n = lay.k, lay.n
    ids, count = tile_ids_fn(k, n)
    return np.asarray(lay.from_matrix(ids.reshape(k, n))).astype(np.int32) + offset, count


def resolve_groups(specs: Sequence[GroupSpec] | GroupSpec, params: Any) -> GroupIndex:
    """Group ids for every leaf of ``params``. Raises ValueError naming the parameter on misfits."""
    if isinstance(specs, GroupSpec):
        specs = [specs]
    leaves = jax.tree.leaves(params)
    leaf_paths = paths.leaf_paths(params)
    shapes = [tuple(np.shape(x)) for x in leaves]
    ids: list = [None] * len(leaves)
    offset = 0
    channel_members = []

    def place(i, new, spec):
        nonlocal ids
        if ids[i] is None:
            ids[i] = np.full(shapes[i], -1, np.int32)
        overlap = (ids[i] >= 0) & (new >= 0)
        if overlap.any():
            raise ValueError(f"{spec.name}: parameter {leaf_paths[i]} already belongs to another "
                             "group; a weight may be in one group only")
        ids[i] = np.where(new >= 0, new, ids[i]).astype(np.int32)

    def matching(pattern, spec):
        hits = [i for i, p in enumerate(leaf_paths) if paths.matches(pattern, p)]
        if not hits:
            near = paths.close_matches(pattern, leaf_paths)
            raise ValueError(f"{spec.name}: pattern {pattern!r} matches no parameter"
                             + (f"; close: {near}" if near else ""))
        return hits

    for spec in specs:
        if not isinstance(spec, GroupSpec):
            raise TypeError(f"groups must be GroupSpecs (output_channels, channels, ...), got "
                            f"{type(spec).__name__}")
        if spec.kind == "channels":
            members, size = [], None
            for pattern, axis in spec.members:
                hits = matching(pattern, spec)
                if len(hits) != 1:
                    raise ValueError(f"{spec.name}: pattern {pattern!r} must match one parameter, "
                                     f"matches {[leaf_paths[i] for i in hits]}")
                i = hits[0]
                if not -len(shapes[i]) <= axis < len(shapes[i]):
                    raise ValueError(f"{spec.name}: axis {axis} is out of range for parameter "
                                     f"{leaf_paths[i]} of shape {shapes[i]}")
                if size is not None and shapes[i][axis] != size:
                    raise ValueError(f"{spec.name}: parameter {leaf_paths[i]} has {shapes[i][axis]} "
                                     f"channels on axis {axis}, the other members have {size}")
                size = shapes[i][axis]
                members.append((i, axis))
            for i, axis in members:
                place(i, _axis_ids(shapes[i], axis, offset), spec)
            channel_members.append((tuple(members), offset, size))
            offset += size
            continue
        for i in matching(spec.pattern, spec):
            shape, path = shapes[i], leaf_paths[i]
            if spec.kind == "per_leaf_axis":
                if len(shape) < 2:
                    raise ValueError(f"{spec.name}: parameter {path} of shape {shape} has no axis "
                                     f"{spec.axis} to group (needs ndim >= 2)")
                place(i, _axis_ids(shape, spec.axis, offset), spec)
                offset += shape[spec.axis]
            elif spec.kind == "blocks":
                if len(shape) < 2:
                    raise ValueError(f"{spec.name}: parameter {path} of shape {shape} is not a matrix")
                bk, bn = spec.block
                k, n = WeightLayout.default(shape).k, WeightLayout.default(shape).n
                if k % bk or n % bn:
                    raise ValueError(f"{spec.name}: block {spec.block} does not divide parameter "
                                     f"{path}'s ({k}, {n}) matrix")

                def tiles(k, n, bk=bk, bn=bn):
                    r = np.arange(k)[:, None] // bk
                    c = np.arange(n)[None, :] // bn
                    return r * (n // bn) + c, (k // bk) * (n // bn)
                new, count = _matrix_ids(shape, tiles, offset)
                place(i, new, spec)
                offset += count
            else:  # nm
                if len(shape) < 2:
                    raise ValueError(f"{spec.name}: parameter {path} of shape {shape} is not a matrix")
                k = WeightLayout.default(shape).k
                if k % spec.m:
                    raise ValueError(f"{spec.name}: m={spec.m} does not divide parameter {path}'s "
                                     f"reduction size K={k}")

                def runs(k, n, m=spec.m):
                    return (np.arange(k)[:, None] // m) * n + np.arange(n)[None, :], (k // m) * n
                new, count = _matrix_ids(shape, runs, offset)
                place(i, new, spec)
                offset += count
    sizes = np.zeros(offset, np.int64)
    for a in ids:
        if a is not None:
            sizes += np.bincount(a[a >= 0].ravel(), minlength=offset)
    return GroupIndex(tuple(ids), offset, sizes, tuple(channel_members))
