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

Stacked layers (``nn.scan``, ``TransformerLM(scan_layers=True)``) keep every
layer's weights in one leaf with leading layer axes. ``stack_axes=n`` on any
constructor says the first ``n`` axes index layers: each layer then gets its
own groups (a hidden neuron of layer 3 is not tied to the same neuron of layer
4), and axes are counted within one layer.
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
    stack_axes: int = 0


@dataclasses.dataclass(frozen=True)
class GroupIndex:
    """Group ids per leaf (``np.int32`` of the leaf's shape, -1 = no group; None if ungrouped)."""

    ids: tuple
    num_groups: int
    sizes: np.ndarray
    channel_members: tuple  # per group spec of kind channels: ((leaf index, axis), ...), first id


def _check_stack_axes(stack_axes, where: str) -> int:
    if isinstance(stack_axes, bool) or not isinstance(stack_axes, int) or stack_axes < 0:
        raise ValueError(f"{where}: stack_axes must be an int >= 0 (leading layer axes), "
                         f"got {stack_axes!r}")
    return stack_axes


def _stacked_name(name: str, stack_axes: int) -> str:
    return name if not stack_axes else f"{name[:-1]}, stack_axes={stack_axes})"


def output_channels(pattern: str = "*kernel", *, stack_axes: int = 0) -> GroupSpec:
    """One group per output channel (index of the last axis) of each leaf matching ``pattern``."""
    stack_axes = _check_stack_axes(stack_axes, "output_channels")
    return GroupSpec("per_leaf_axis", pattern=pattern, axis=-1, stack_axes=stack_axes,
                     name=_stacked_name(f"output_channels({pattern!r})", stack_axes))


def input_neurons(pattern: str = "*kernel", *, stack_axes: int = 0) -> GroupSpec:
    """One group per input neuron (index of axis -2) of each leaf matching ``pattern``."""
    stack_axes = _check_stack_axes(stack_axes, "input_neurons")
    return GroupSpec("per_leaf_axis", pattern=pattern, axis=-2, stack_axes=stack_axes,
                     name=_stacked_name(f"input_neurons({pattern!r})", stack_axes))


def channels(*members: tuple[str, int], stack_axes: int = 0) -> GroupSpec:
    """One group per index of a channel shared by several leaves: ``(pattern, axis)`` pairs,
    each pattern matching exactly one leaf, all axes of the same size (and, with
    ``stack_axes``, the same layer axes)."""
    if not members:
        raise ValueError("channels needs at least one (pattern, axis) member")
    for mem in members:
        if not (isinstance(mem, tuple) and len(mem) == 2 and isinstance(mem[1], int)):
            raise ValueError(f"channels: members must be (pattern, axis) pairs, got {mem!r}")
    stack_axes = _check_stack_axes(stack_axes, "channels")
    return GroupSpec("channels", members=tuple(members), stack_axes=stack_axes,
                     name=_stacked_name(f"channels{tuple(members)!r}", stack_axes))


def attention_heads(query: str, key: str, value: str, out: str, *, stack_axes: int = 0) -> GroupSpec:
    """One group per attention head across Flax's q/k/v kernels (axis -2) and out kernel (axis 0)."""
    return channels((query, -2), (key, -2), (value, -2), (out, 0), stack_axes=stack_axes)


def blocks(pattern: str, block: tuple[int, int], *, stack_axes: int = 0) -> GroupSpec:
    """``(bk, bn)`` tiles of the ``(K, N)`` matrix (Flax layout) of each leaf matching ``pattern``."""
    if len(block) != 2 or any(not isinstance(b, int) or b < 1 for b in block):
        raise ValueError(f"blocks: block must be two positive ints, got {block!r}")
    stack_axes = _check_stack_axes(stack_axes, "blocks")
    return GroupSpec("blocks", pattern=pattern, block=tuple(block), stack_axes=stack_axes,
                     name=_stacked_name(f"blocks({pattern!r}, {block})", stack_axes))


def nm_groups(pattern: str, m: int, *, stack_axes: int = 0) -> GroupSpec:
    """Groups of ``m`` consecutive entries along K, per column, of each leaf matching ``pattern``."""
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"nm_groups: m must be a positive int, got {m!r}")
    stack_axes = _check_stack_axes(stack_axes, "nm_groups")
    return GroupSpec("nm", pattern=pattern, m=m, stack_axes=stack_axes,
                     name=_stacked_name(f"nm_groups({pattern!r}, {m})", stack_axes))


def _per_layer(stack_shape, ids, count):
    """Per-layer ids (of one layer's shape) repeated over the layer axes, each layer its own
    ``count`` groups."""
    layers = int(np.prod(stack_shape, dtype=np.int64))
    layer_offsets = (np.arange(layers, dtype=np.int32) * count).reshape(
        tuple(stack_shape) + (1,) * ids.ndim)
    return (ids[(None,) * len(stack_shape)] + layer_offsets).astype(np.int32), layers * count


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

    def layer_shape_of(i, spec, min_ndim):
        """One layer's shape of leaf ``i``: its shape without ``spec.stack_axes`` leading axes."""
        layer_shape = shapes[i][spec.stack_axes:]
        if len(layer_shape) < min_ndim:
            what = "a matrix" if min_ndim == 2 else "an array"
            aside = f" once its {spec.stack_axes} layer axes are set aside" if spec.stack_axes else ""
            raise ValueError(f"{spec.name}: parameter {leaf_paths[i]} of shape {shapes[i]} is not "
                             f"{what}{aside} (needs ndim >= {min_ndim + spec.stack_axes})")
        return layer_shape

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
            members, size, stack = [], None, None
            for pattern, axis in spec.members:
                hits = matching(pattern, spec)
                if len(hits) != 1:
                    raise ValueError(f"{spec.name}: pattern {pattern!r} must match one parameter, "
                                     f"matches {[leaf_paths[i] for i in hits]}")
                i = hits[0]
                layer_shape = layer_shape_of(i, spec, 1)
                if not -len(layer_shape) <= axis < len(layer_shape):
                    raise ValueError(f"{spec.name}: axis {axis} is out of range for parameter "
                                     f"{leaf_paths[i]} of (per-layer) shape {layer_shape}")
                if size is not None and layer_shape[axis] != size:
                    raise ValueError(f"{spec.name}: parameter {leaf_paths[i]} has {layer_shape[axis]} "
                                     f"channels on axis {axis}, the other members have {size}")
                if stack is not None and shapes[i][:spec.stack_axes] != stack:
                    raise ValueError(f"{spec.name}: parameter {leaf_paths[i]} has layer axes "
                                     f"{shapes[i][:spec.stack_axes]}, the other members have {stack}")
                size, stack = layer_shape[axis], shapes[i][:spec.stack_axes]
                members.append((i, axis))
            for i, axis in members:
                ids_layer = _axis_ids(layer_shape_of(i, spec, 1), axis, 0)
                place(i, _per_layer(stack, ids_layer, size)[0] + offset, spec)
            if not spec.stack_axes:
                channel_members.append((tuple(members), offset, size))
            offset += int(np.prod(stack, dtype=np.int64)) * size
            continue
        for i in matching(spec.pattern, spec):
            path = leaf_paths[i]
            shape = layer_shape_of(i, spec, 2)
            if spec.kind == "per_leaf_axis":
                ids_layer, count = _axis_ids(shape, spec.axis, 0), shape[spec.axis]
            elif spec.kind == "blocks":
                bk, bn = spec.block
                k, n = WeightLayout.default(shape).k, WeightLayout.default(shape).n
                if k % bk or n % bn:
                    raise ValueError(f"{spec.name}: block {spec.block} does not divide parameter "
                                     f"{path}'s ({k}, {n}) matrix")

                def tiles(k, n, bk=bk, bn=bn):
                    r = np.arange(k)[:, None] // bk
                    c = np.arange(n)[None, :] // bn
                    return r * (n // bn) + c, (k // bk) * (n // bn)
                ids_layer, count = _matrix_ids(shape, tiles, 0)
            else:  # nm
                k = WeightLayout.default(shape).k
                if k % spec.m:
                    raise ValueError(f"{spec.name}: m={spec.m} does not divide parameter {path}'s "
                                     f"reduction size K={k}")

                def runs(k, n, m=spec.m):
                    return (np.arange(k)[:, None] // m) * n + np.arange(n)[None, :], (k // m) * n
                ids_layer, count = _matrix_ids(shape, runs, 0)
            new, total = _per_layer(shapes[i][:spec.stack_axes], ids_layer, count)
            place(i, new + offset, spec)
            offset += total
    sizes = np.zeros(offset, np.int64)
    for a in ids:
        if a is not None:
            sizes += np.bincount(a[a >= 0].ravel(), minlength=offset)
    return GroupIndex(tuple(ids), offset, sizes, tuple(channel_members))
