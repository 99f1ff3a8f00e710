"""View ops: the structural ops a weight may pass through on its way to a matmul.

Flax casts kernels (``convert_element_type``), DenseGeneral reshapes them,
``fori_loop`` bodies index stacked weights (``slice``/``squeeze``,
``dynamic_slice``), attention transposes them. Such ops keep a parameter a
parameter: the ref's value and mask go through the op and ``origins`` records
which leaf axes each resulting dimension came from. Scaling by a scalar
(``w * 0.5``, ``2 * w``, ``w / c``) is a view in effect: it commutes with masks
and changes no axis. Anything else materializes the ref into a plain array.

A factorized ref (Monarch, block-diagonal) has no dense value, only factors with
the leaf's stack axes leading. Taking one layer of a stacked leaf (``w[i]`` in a
``fori_loop``, ``w[0]``) slices the factors themselves, as a scan's slice does,
so the site multiplies by that layer's factors; other views wait in
``pending_ops`` until a dense value is needed.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
from jax import lax

from sparsejax.compiler.param_ref import Origins, ParamRef

# Ops that leave values' dimensions alone; masks pass through unchanged.
_VALUE_ONLY = {"convert_element_type", "reduce_precision", "copy", "copy_p", "optimization_barrier"}
# Ops whose origins bookkeeping is implemented below.
_STRUCTURAL = {"transpose", "reshape", "broadcast_in_dim", "squeeze", "slice",
               "dynamic_slice", "rev", "sharding_constraint"}
VIEW_OPS = frozenset(_VALUE_ONLY | _STRUCTURAL)


def _scalar_scale(eqn, invals: Sequence[Any]) -> int | None:
    """The ref's operand index when ``eqn`` scales one ref by a scalar (``w*c``, ``c*w``, ``w/c``)."""
    name = eqn.primitive.name
    if name not in ("mul", "div") or len(invals) != 2:
        return None
    refs = [i for i, x in enumerate(invals) if isinstance(x, ParamRef)]
    if len(refs) != 1 or (name == "div" and refs[0] != 0):
        return None
    i = refs[0]
    if eqn.invars[1 - i].aval.shape != () or eqn.outvars[0].aval.shape != eqn.invars[i].aval.shape:
        return None
    return i


def view_operand(eqn, invals: Sequence[Any]) -> int | None:
    """The index of the one ref operand when ``eqn`` is a view of it, else None."""
    if _scalar_scale(eqn, invals) is not None:
        return _scalar_scale(eqn, invals)
    if eqn.primitive.name not in VIEW_OPS or not invals or not isinstance(invals[0], ParamRef):
        return None
    if eqn.primitive.name == "reshape" and eqn.params.get("dimensions") is not None:
        return None
    if any(isinstance(v, ParamRef) for v in invals[1:]) or len(eqn.outvars) != 1:
        return None
    return 0


def is_view(eqn, invals: Sequence[Any]) -> bool:
    """True when ``eqn`` is a view op of exactly one ref operand."""
    return view_operand(eqn, invals) is not None


def _reshape_origins(origins: Origins, old_shape: Sequence[int],
                     new_shape: Sequence[int]) -> tuple[Origins, tuple[int, ...]]:
    """Groups old and new dims into runs of equal size; each new dim inherits its run's axes."""
    consumed: list[int] = []
    old = [(s, o) for s, o in zip(old_shape, origins)]
    for s, o in old:
        if s == 1:
            consumed.extend(o)
    old = [(s, o) for s, o in old if s != 1]
    new_origins: list[tuple[int, ...]] = [()] * len(new_shape)
    new_idx = [i for i, s in enumerate(new_shape) if s != 1]
    i = j = 0
    while i < len(old) or j < len(new_idx):
        group_old, group_new = [old[i]], [new_idx[j]]
        p_old, p_new = old[i][0], new_shape[new_idx[j]]
        i, j = i + 1, j + 1
        while p_old != p_new:
            if p_old < p_new:
                group_old.append(old[i]); p_old *= old[i][0]; i += 1
            else:
                group_new.append(new_idx[j]); p_new *= new_shape[new_idx[j]]; j += 1
        axes = tuple(sorted({a for _, o in group_old for a in o}))
        for n in group_new:
            new_origins[n] = axes
    return tuple(new_origins), tuple(consumed)


def _index_state(eqn, ref: ParamRef, others: Sequence[Any]):
    """A factorized ref's factors after ``eqn`` when it takes (slice to size 1) or drops
    (squeeze) one layer of the leading stack axis the factors still have; else None."""
    layout = getattr(ref.handler, "layout", None)
    if ref.pending_ops or layout is None:
        return None
    removed = [a for a in layout.stack_axes if a in ref.consumed]
    if len(removed) == len(layout.stack_axes):
        return None
    axis = layout.stack_axes[len(removed)]              # the factors' leading axis
    dims = [d for d, o in enumerate(ref.origins) if o == (axis,)]
    if len(dims) != 1:
        return None
    d, name = dims[0], eqn.primitive.name
    in_shape, out_shape = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
    one_layer = (len(in_shape) == len(out_shape) and out_shape[d] == 1 and
                 all(a == b for j, (a, b) in enumerate(zip(in_shape, out_shape)) if j != d))
    if name == "slice" and one_layer and not any(s not in (None, 1) for s in
                                                    (eqn.params.get("strides") or ())):
        start = eqn.params["start_indices"][d]
        take = lambda f: lax.slice_in_dim(f, start, start + 1, axis=0)
    elif name == "dynamic_slice" and one_layer:
        take = lambda f: lax.dynamic_slice_in_dim(f, others[d], 1, axis=0)
    elif ((name == "squeeze" and d in {x % len(in_shape) for x in eqn.params["dimensions"]})
          or (name == "reshape" and in_shape[d] == 1
              and tuple(out_shape) == tuple(in_shape[:d] + in_shape[d + 1:]))):
        # dropping the layer axis a slice left at size 1 (jnp indexing emits either op)
        if any(f.shape[0] != 1 for f in jax.tree.leaves(ref.state)):
            return None
        take = lambda f: lax.squeeze(f, (0,))
    else:
        return None
    return jax.tree.map(take, ref.state)


def apply_view(eqn, ref: ParamRef, others: Sequence[Any]) -> ParamRef:
    """The ref after ``eqn``: value and mask transformed, origins updated.

    ``others`` are the eqn's other operands (a scale's scalar: mul commutes, so the
    ref goes first whichever side it came from).
    """
    prim, params = eqn.primitive, eqn.params
    name = prim.name
    scale = name in ("mul", "div")      # the only non-structural views: scalar scales

    def run(x):
        if x is None:
            return None
        return prim.bind(x, *others, **params)

    state = ref.state
    if ref.value is None:
        # Factorized leaves have no dense value: taking one layer slices the factors;
        # any other op waits for materialization.
        state = None if scale else _index_state(eqn, ref, others)
        if state is None:
            state, pending = ref.state, ref.pending_ops + ((eqn, tuple(others)),)
        else:
            pending = ref.pending_ops
        value = None
    else:
        value, pending = run(ref.value), ref.pending_ops
    if scale:   # a scale changes values, not which entries are kept
        return ref.replace(value=value, pending_ops=pending, ops=ref.ops + ("scale",))
    mask = ref.mask if name in _VALUE_ONLY else run(ref.mask)
    origins, consumed = ref.origins, ref.consumed
    in_shape = tuple(eqn.invars[0].aval.shape)
    out_shape = tuple(eqn.outvars[0].aval.shape)
    if name == "transpose":
        origins = tuple(origins[p] for p in params["permutation"])
    elif name == "reshape":
        origins, extra = _reshape_origins(origins, in_shape, out_shape)
        consumed = consumed + extra
    elif name == "broadcast_in_dim":
        new = [()] * len(out_shape)
        for src, dst in enumerate(params["broadcast_dimensions"]):
            new[dst] = origins[src]
        origins = tuple(new)
    elif name == "squeeze":
        dims = {d % len(in_shape) for d in params["dimensions"]}
        consumed = consumed + tuple(a for d in sorted(dims) for a in origins[d])
        origins = tuple(o for d, o in enumerate(origins) if d not in dims)
    return ref.replace(value=value, mask=mask, state=state, origins=origins, consumed=consumed,
                       pending_ops=pending, ops=ref.ops + (name,))


def replay_pending(ref: ParamRef, dense_leaf_view) -> Any:
    """Applies a factorized ref's pending view ops to a reconstructed dense value."""
    x = dense_leaf_view
    for eqn, others in ref.pending_ops:
        x = eqn.primitive.bind(x, *others, **eqn.params)
    return x
