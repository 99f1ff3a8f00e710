"""Passes: how each kind of rule rewrites the sites it owns."""

from __future__ import annotations

from sparsejax.compiler.passes.activation import (ActivationRewrite, SiteHooks, activation_hooks,
                                                  activation_rewrite, check_plan, measuring_hooks,
                                                  register_activation_rewrite)
from sparsejax.compiler.passes.base import WeightHandler
from sparsejax.compiler.passes.factorized import FactorizedHandler
from sparsejax.compiler.passes.iso_flop import IsoFlopFactorsHandler, SparseWideHandler
from sparsejax.compiler.passes import iso_flop as _iso_flop
from sparsejax.compiler.passes.masking import MaskHandler
from sparsejax.compiler.passes.sparse_input import ActivationSparseHandler, ffn_roles
from sparsejax.compiler.passes.spark import SparkRewrite
from sparsejax.compiler.passes.thresholds import ReLURewrite
from sparsejax.rules import (Factorize, MaskRule, ReLUActivation, SparkTopK, SparseIsoFlop,
                             SparseWide)

_WEIGHT_HANDLERS: list[tuple[type, type[WeightHandler]]] = [
    (MaskRule, MaskHandler), (Factorize, FactorizedHandler),
    (SparseWide, SparseWideHandler), (SparseIsoFlop, IsoFlopFactorsHandler)]


def register_weight_handler(rule_type: type, handler_type: type[WeightHandler]) -> None:
    """Registers the pass for a new weight rule type (most recent registration wins)."""
    _WEIGHT_HANDLERS.insert(0, (rule_type, handler_type))


def weight_handler(rule, path, layout, sites) -> WeightHandler:
    for rule_type, handler_type in _WEIGHT_HANDLERS:
        if isinstance(rule, rule_type):
            return handler_type(rule, path, layout, sites)
    raise TypeError(f"no compiler pass handles rule {rule.describe()}")


def rebind_handlers(sfn, handlers: dict, traced) -> None:
    """Tells every handler where the sites of the program about to be rewritten sit
    (:meth:`WeightHandler.rebind`): each call signature is traced anew, and its eqns need
    not sit where init's trace had them."""
    sites: dict[str, list] = {}
    for s in traced.sites:
        sites.setdefault(s.path, []).append(s)
    roles = None
    for path, handler in handlers.items():
        if isinstance(handler, ActivationSparseHandler):
            if roles is None:
                roles = ffn_roles(sfn, traced, plain=sfn._dense_gemv)[0]
            handler.rebind(sites.get(path, ()), roles.get(path, {}))
        else:
            handler.rebind(sites.get(path, ()))


def program_hooks(handlers, traced) -> dict:
    """Eqn hooks that weight passes need beside their sites (Sparse Wide: inlining the
    calls between a widened FFN's up and down, so they bind on the wider values)."""
    return _iso_flop.program_hooks(handlers, traced)


register_activation_rewrite(SparkTopK, SparkRewrite())
register_activation_rewrite(ReLUActivation, ReLURewrite())
