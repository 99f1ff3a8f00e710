"""The rewritten program: a traced function walked with each ruled leaf entering as its pass's ref.

:func:`rewrite_site` sends a matmul/conv whose weight is a ref to that ref's handler;
:func:`rewritten_program` builds the function of flat inputs (params leaves, present
masks, array args) that ``SparseFunction`` traces once per signature into a new jaxpr.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from sparsejax.compiler.interpreter import Interpreter, bind_eqn
from sparsejax.compiler.param_ref import is_ref, materialize
from sparsejax.compiler.passes.thresholds import l1_hook

__all__ = ["rewrite_site", "rewritten_program"]


def rewrite_site(interp: Interpreter, eqn, key, invals, scope):
    """A weight site: its handler computes it (the original eqn where no handler owns it)."""
    refs = [x for x in invals[:2] if is_ref(x)]
    if len(refs) == 1 and refs[0].handler is not None:
        return refs[0].handler.on_site(interp, eqn, key, invals, scope)
    return bind_eqn(eqn, [materialize(x) for x in invals])


def compose_input_hooks(first: Callable, then: Callable) -> Callable:
    """Two input hooks on one eqn, ``first`` then ``then`` (both see the eqn's state)."""
    def hook(eqn, invals, state):
        return then(eqn, first(eqn, invals, state), state)
    return hook


def rewritten_program(traced, hooks: dict, handlers: Sequence[Any], n_params: int,
                      has_mask: Sequence[bool], sparams_treedef, dense_treedef,
                      mask_item: Callable[[Any], Any], input_hooks: dict | None = None,
                      state_keys: Sequence[Any] = (), aux_points: Sequence[tuple] = (),
                      fusion: Any = None) -> Callable:
    """The rewritten function of flat inputs (params leaves, present masks, array args,
    then one state array per key of ``state_keys``: the thresholds of those eqns).

    Args:
      traced: the :class:`~sparsejax.compiler.plan.Traced` program.
      hooks: eqn key -> activation hook (see :mod:`~sparsejax.compiler.passes.activation`).
      handlers: per dense leaf, its weight handler or None (the leaf enters as it is).
      n_params: how many sparse-param leaves lead the inputs.
      has_mask: per sparse-param leaf, whether a mask follows the params for it.
      mask_item: a slot's masks -> what its handler takes (an array, a subtree of factor
        masks, or None).
      input_hooks: eqn key -> input hook (thresholds, ReLU substitution).
      aux_points: ``(key, operand)`` inputs whose mean ``|x|`` and zero fraction (after
        the other hooks) the program also returns: ``(outputs, {"activation_l1",
        "activation_sparsity"})``, each the mean over points and layers.
      fusion: a :class:`~sparsejax.compiler.passes.sibling_fusion.SiblingFusion` (sibling sites
        computed as one product), or None.
    """
    interp = Interpreter(rewrite_site if fusion is None else fusion.on_site, hooks,
                         input_hooks=input_hooks)
    for key, operand in aux_points:
        hook = l1_hook(key, operand, interp.emit)
        interp.input_hooks[key] = (compose_input_hooks(interp.input_hooks[key], hook)
                                   if key in interp.input_hooks else hook)
    interp._hooked_prefixes |= {k[:i] for k, _ in aux_points for i in range(1, len(k))}
    n_state = len(state_keys)

    def program(*inputs):
        states = inputs[len(inputs) - n_state:] if n_state else ()
        inputs = inputs[:len(inputs) - n_state]
        interp.hook_state, interp.sink = dict(zip(state_keys, states)), {}
        if fusion is not None:     # sibling groups' per-layer tables, sliced by the scans
            interp.hook_state.update(fusion.initial_state())
        leaves, rest = inputs[:n_params], list(inputs[n_params:])
        masks = [rest.pop(0) if h else None for h in has_mask]
        slot_items = dense_treedef.flatten_up_to(
            jax.tree_util.tree_unflatten(sparams_treedef, leaves))
        slot_masks = dense_treedef.flatten_up_to(
            jax.tree_util.tree_unflatten(sparams_treedef, masks))
        invals = [h.make_input(p, mask_item(m)) if h is not None else p
                  for h, p, m in zip(handlers, slot_items, slot_masks)]
        outs = interp.run(traced.closed.jaxpr, traced.closed.consts, [*invals, *rest])
        if not aux_points:
            return outs
        stats = jnp.concatenate([interp.sink[k].reshape(-1, 2) for k, _ in aux_points])
        return outs, {"activation_l1": jnp.mean(stats[:, 0]),
                      "activation_sparsity": jnp.mean(stats[:, 1])}

    return program
