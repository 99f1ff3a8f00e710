"""View ops: the structural ops a weight may pass through on its way to a matmul.

Flax casts kernels (``convert_element_type``), DenseGeneral reshapes them,
``fori_loop`` bodies index stacked weights (``slice``/``squeeze``,
``dynamic_slice``), attention transposes them. Such ops keep a parameter a
parameter: the ref's value and mask go through the op and ``origins`` records
which leaf axes each resulting dimension came from. Anything else materializes
the ref into a plain array.
"""

from __future__ import annotations

from typing import Any, Sequence

from sparsejax.compiler.param_ref import Origins, ParamRef

# Ops that leave values' dimensions alone; masks pass through unchanged.
_VALUE_ONLY = {"convert_element_type", "reduce_precision", "copy", "copy_p", "optimization_barrier"}
# Ops whose origins bookkeeping is implemented below.
_STRUCTURAL = {"transpose", "reshape", "broadcast_in_dim", "squeeze", "slice",
               "dynamic_slice", "rev", "sharding_constraint"}
VIEW_OPS = frozenset(_VALUE_ONLY | _STRUCTURAL)


def is_view(eqn, invals: Sequence[Any]) -> bool:
    """True when ``eqn`` is a view op whose first operand is a ref and no other is."""
    if eqn.primitive.name not in VIEW_OPS or not invals or not isinstance(invals[0], ParamRef):
        return False
    if eqn.primitive.name == "reshape" and eqn.params.get("dimensions") is not None:
        return False
    return not any(isinstance(v, ParamRef) for v in invals[1:]) and len(eqn.outvars) == 1


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


def apply_view(eqn, ref: ParamRef, others: Sequence[Any]) -> ParamRef:
    """The ref after ``eqn``: value and mask transformed, origins updated."""
    prim, params = eqn.primitive, eqn.params
    name = prim.name

    def run(x):
        if x is None:
            return None
        return prim.bind(x, *others, **params)

    if ref.value is None:
        # Factorized leaves have no dense value; remember the op for materialization.
        value, pending = None, ref.pending_ops + ((eqn, tuple(others)),)
    else:
        value, pending = run(ref.value), ref.pending_ops
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
    return ref.replace(value=value, mask=mask, origins=origins, consumed=consumed,
                       pending_ops=pending, ops=ref.ops + (name,))


def replay_pending(ref: ParamRef, dense_leaf_view) -> Any:
    """Applies a factorized ref's pending view ops to a reconstructed dense value."""
    x = dense_leaf_view
    for eqn, others in ref.pending_ops:
        x = eqn.primitive.bind(x, *others, **eqn.params)
    return x
