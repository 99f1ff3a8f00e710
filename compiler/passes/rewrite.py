"""The rewritten program: a traced function walked with each ruled leaf entering as its pass's ref.

:func:`rewrite_site` sends a matmul/conv whose weight is a ref to that ref's handler;
:func:`rewritten_program` builds the function of flat inputs (params leaves, present
masks, array args) that ``SparseFunction`` traces once per signature into a new jaxpr.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax

from sparsejax.compiler.interpreter import Interpreter, bind_eqn
from sparsejax.compiler.param_ref import is_ref, materialize

__all__ = ["rewrite_site", "rewritten_program"]


def rewrite_site(interp: Interpreter, eqn, key, invals, scope):
    """A weight site: its handler computes it (the original eqn where no handler owns it)."""
    refs = [x for x in invals[:2] if is_ref(x)]
    if len(refs) == 1 and refs[0].handler is not None:
        return refs[0].handler.on_site(interp, eqn, key, invals, scope)
    return bind_eqn(eqn, [materialize(x) for x in invals])


def rewritten_program(traced, hooks: dict, handlers: Sequence[Any], n_params: int,
                      has_mask: Sequence[bool], sparams_treedef, dense_treedef,
                      is_array: Callable[[Any], bool]) -> Callable:
    """The rewritten function of flat inputs (params leaves, present masks, array args).

    Args:
      traced: the :class:`~sparsejax.compiler.plan.Traced` program.
      hooks: eqn key -> activation hook (see :mod:`~sparsejax.compiler.passes.activation`).
      handlers: per dense leaf, its weight handler or None (the leaf enters as it is).
      n_params: how many sparse-param leaves lead the inputs.
      has_mask: per sparse-param leaf, whether a mask follows the params for it.
    """
    interp = Interpreter(rewrite_site, hooks)

    def program(*inputs):
        leaves, rest = inputs[:n_params], list(inputs[n_params:])
        masks = [rest.pop(0) if h else None for h in has_mask]
        slot_items = dense_treedef.flatten_up_to(
            jax.tree_util.tree_unflatten(sparams_treedef, leaves))
        slot_masks = dense_treedef.flatten_up_to(
            jax.tree_util.tree_unflatten(sparams_treedef, masks))
        invals = [h.make_input(p, m if is_array(m) else None) if h is not None else p
                  for h, p, m in zip(handlers, slot_items, slot_masks)]
        return interp.run(traced.closed.jaxpr, traced.closed.consts, [*invals, *rest])

    return program
