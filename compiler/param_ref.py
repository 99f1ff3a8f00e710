"""ParamRef: a parameter leaf as it flows through a jaxpr.

While the interpreter evaluates a jaxpr, a parameter leaf that a rule cares about
travels as a :class:`ParamRef` instead of a plain array. The ref remembers which
leaf it came from (``path``), how each of its current dimensions maps back to the
leaf's axes (``origins``), and the sparsity state that goes with it:

* ``value``: the current (already masked) dense value in the current view, or
  ``None`` when the leaf exists only as factors;
* ``mask``: a leaf-shaped mask, carried through the same view ops as ``value``;
* ``state``: a pytree whose leading axes are the leaf's stack axes (factors,
  kernel index tables); scans slice it together with the leaf.

ParamRef is a pytree, so it crosses ``lax.scan``, ``lax.cond``,
``jax.checkpoint`` and friends like any other operand.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

Origins = tuple[tuple[int, ...], ...]


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class ParamRef:
    path: str
    value: Any
    mask: Any = None
    state: Any = None
    origins: Origins = ()
    consumed: tuple[int, ...] = ()     # leaf axes indexed away (scan slices, squeezes)
    pending_ops: tuple[Any, ...] = ()  # view ops not yet applied (factorized refs only)
    handler: Any = None                # the rule's compiled form; None while analysing
    ops: tuple[str, ...] = ()          # names of the view ops applied since the leaf

    def tree_flatten(self):
        children = (self.value, self.mask, self.state)
        aux = (self.path, self.origins, self.consumed, self.pending_ops, self.handler, self.ops)
        return children, aux

    @classmethod
    def tree_unflatten(cls, aux, children):
        path, origins, consumed, pending_ops, handler, ops = aux
        value, mask, state = children
        return cls(path, value, mask, state, origins, consumed, pending_ops, handler, ops)

    @classmethod
    def for_leaf(cls, path: str, value, ndim: int, **kwargs) -> "ParamRef":
        return cls(path, value, origins=tuple((axis,) for axis in range(ndim)), **kwargs)

    def replace(self, **kwargs) -> "ParamRef":
        return dataclasses.replace(self, **kwargs)

    def after_leading_slice(self) -> "ParamRef":
        """The metadata of this ref once a scan has sliced its leading axis away.

        Children are sliced by the scan itself; only the bookkeeping changes here.
        """
        return self.replace(origins=self.origins[1:], consumed=self.consumed + self.origins[0],
                            ops=self.ops + ("scan_slice",))

    def materialize(self) -> jax.Array:
        """The dense value in the current view, as the original program would see it."""
        if self.value is not None:
            return self.value
        return self.handler.materialize(self)


def materialize(x: Any) -> Any:
    return x.materialize() if isinstance(x, ParamRef) else x


def is_ref(x: Any) -> bool:
    return isinstance(x, ParamRef)
