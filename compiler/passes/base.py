"""What every weight pass provides to the rewriting interpreter."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from sparsejax.compiler.interpreter import Interpreter, Key, Scope, bind_eqn
from sparsejax.compiler.param_ref import ParamRef, materialize
from sparsejax.compiler.sites import WeightSite
from sparsejax.kernels import path_choice
from sparsejax.layout import WeightLayout


class WeightHandler:
    """The compiled form of one rule on one parameter leaf.

    ``make_input`` turns the leaf's entry in the sparse params (and its mask) into
    the ParamRef the interpreter carries; ``on_site`` computes a matmul/conv that
    consumes the ref; ``materialize`` gives its dense value for any other use.
    The default site computes the original eqn on the materialized value.
    """

    def __init__(self, rule, path: str, layout: WeightLayout | None, sites: Sequence[WeightSite]):
        self.rule, self.path, self.layout, self.sites = rule, path, layout, tuple(sites)

    def init(self, leaf, key) -> tuple[Any, Any]:
        """(entry in the sparse params, mask or None) for the dense ``leaf``."""
        raise NotImplementedError

    def make_input(self, item: Any, mask: Any) -> ParamRef:
        raise NotImplementedError

    @property
    def size(self) -> int:
        return math.prod(self.layout.shape) if self.layout else math.prod(self.sites[0].weight_shape)

    def params_after(self, density: float) -> int:
        return int(round(self.size * density))

    def flops_after(self, site: WeightSite, density: float) -> int:
        return int(round(site.flops * density))

    def on_site(self, interp: Interpreter, eqn, key: Key, invals: list, scope: Scope) -> list:
        return bind_eqn(eqn, [materialize(x) for x in invals])

    def materialize(self, ref: ParamRef):
        return ref.value

    def site_path(self, key: Key) -> str:
        """How this handler computes the site at ``key``, for the report."""
        return "XLA"

    def site_reason(self, site: WeightSite) -> str | None:
        """Why this handler computes ``site`` as the original eqn (None: it rewrites it)."""
        return None

    def rebind(self, sites: Sequence[WeightSite]) -> None:
        """Learns the sites of the program about to be rewritten.

        Every call signature is traced anew, and its eqns (the site keys) need not sit
        where init's trace had them: params of another dtype add or drop casts, and a
        KV-cache call is another program. A handler that decides per site decides for
        these too, so no site falls back to XLA for being "not found at init".
        """
        known = {s.key: s for s in self.sites}
        known.update((s.key, s) for s in sites)
        self.sites = tuple(known.values())
        reasons = getattr(self, "_reasons", None)
        if reasons is not None:
            reasons.update((s.key, self.site_reason(s)) for s in sites)


# View ops a direct site computation absorbs: Flax's dtype cast, DenseGeneral's reshape,
# a scan's slice and per-layer indexing (``w[i]``: slice or dynamic_slice, then squeeze),
# which slice the site's state alike. (A slice that keeps more than one layer, or part of
# a matrix, leaves the weight a size other than K·N and is refused below.)
DIRECT_VIEWS = frozenset({"convert_element_type", "reshape", "copy", "copy_p", "scan_slice",
                          "slice", "dynamic_slice", "squeeze"})


def direct_site_reason(site: WeightSite, layout: WeightLayout | None) -> str | None:
    """Why a pass cannot compute ``site`` as ``x2 @ W(K, N)`` in ``layout`` (None if it can)."""
    if site.primitive != "dot_general" or layout is None or site.layout != layout:
        return "the site uses the weight in another layout"
    (_, _), (lb, rb) = site.dimension_numbers
    if lb or rb:
        return "batched dot_general"
    if math.prod(site.weight_shape) != layout.k * layout.n:
        return "stacked layers not sliced by a scan or indexed per layer"
    if set(site.view_ops) - DIRECT_VIEWS:
        return f"weight passes through {sorted(set(site.view_ops) - DIRECT_VIEWS)}"
    return None


def matmul_at_site(eqn, operand: int, x, matmul):
    """Computes a dot_general site as ``matmul(x2) -> y2`` in the ``(K, N)`` matrix view.

    ``x2`` is the activation with its contracted dims last, in the weight's storage order
    (the order of the weight's dims at the site, which direct sites keep from the leaf),
    flattened to ``(..., K)``; ``matmul`` returns ``(..., N)``. The result is put back
    in dot_general's output layout (weight's free dims after the activation's when
    the weight is the right operand, before them when it is the left one).
    """
    x2 = site_matrix_input(eqn, operand, x)
    return site_output(eqn, operand, x2, matmul(x2))


def activation_plan(eqn, operand: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(free dims, contracted dims in the weight's storage order) of a site's activation:
    the transpose that makes its ``(..., K)`` matrix view (two sites with the same plan
    and the same activation read the same ``x2``)."""
    (lc, rc), _ = eqn.params["dimension_numbers"]
    x_contract, w_contract = (lc, rc) if operand == 1 else (rc, lc)
    pairs = sorted(zip(w_contract, x_contract))    # K in storage order, as the layout has it
    x_contract = tuple(x_ for _, x_ in pairs)
    ndim = len(eqn.invars[1 - operand].aval.shape)
    return tuple(d for d in range(ndim) if d not in x_contract), x_contract


def site_matrix_input(eqn, operand: int, x):
    """The activation ``x`` of a dot_general site as ``x2 (..., K)`` (see :func:`matmul_at_site`)."""
    x_free, x_contract = activation_plan(eqn, operand)
    x2 = jnp.transpose(x, (*x_free, *x_contract))
    return x2.reshape(*x2.shape[:len(x_free)], math.prod(x.shape[d] for d in x_contract))


def site_output(eqn, operand: int, x2, y) -> list:
    """``y (..., N)``, the product of ``x2`` and the site's weight, in the eqn's output layout."""
    (lc, rc), _ = eqn.params["dimension_numbers"]
    w_contract = lc if operand == 0 else rc
    w_shape = eqn.invars[operand].aval.shape
    w_free_shape = [w_shape[d] for d in range(len(w_shape)) if d not in w_contract]
    y = y.reshape(*x2.shape[:-1], *w_free_shape)
    if operand == 0:
        nx = x2.ndim - 1
        y = jnp.transpose(y, (*range(nx, y.ndim), *range(nx)))
    return [y.astype(eqn.outvars[0].aval.dtype)]


# --------------------------------------------------------------------------- path choice

_autodiff = threading.local()
_AUTODIFF_TRACERS = ("JVPTracer", "LinearizeTracer")


def under_autodiff(values) -> bool:
    """Whether any of ``values`` is being differentiated (a JVP/linearize tracer, maybe under vmap).

    The rewritten program is traced once per signature, with abstract inputs, and
    then differentiated by JAX; so a site learns that its backward pass will run
    from the caller, who sees the tracers: ``jax.grad(loss)`` around a sparsified
    function. (A ``jax.jit`` between ``grad`` and the call hides them; the site
    then measures its forward pass only.)
    """
    for x in values:
        while isinstance(x, jax.core.Tracer):
            name = type(x).__name__
            if name in _AUTODIFF_TRACERS:
                return True
            x = getattr(x, "val", None) if name == "BatchTracer" else None
    return False


@contextlib.contextmanager
def rewriting_for_autodiff(flag: bool):
    """Within the block, sites being rewritten know whether their backward pass will run."""
    previous = getattr(_autodiff, "flag", False)
    _autodiff.flag = bool(flag)
    try:
        yield
    finally:
        _autodiff.flag = previous


def differentiated() -> bool:
    """Whether the program being rewritten now will be differentiated (see ``under_autodiff``)."""
    return getattr(_autodiff, "flag", False)


def with_backward(fn: Callable) -> Callable:
    """``fn`` and its VJP in one call: what a site costs in a training step (value + dX + dW)."""
    def forward_backward(*args):
        y, vjp = jax.vjp(fn, *args)
        return y, vjp(y)
    return forward_backward


class PathChoosing:
    """Mixin for handlers whose sites pick a path with :func:`path_choice.choose`.

    Each choice is remembered per site key (the latest trace's), so the report
    shows the path each site took and its measured time against dense.
    """

    def _choose(self, key, op: str, signature: str, candidates, arg_specs,
                baseline: str = "xla_dense", check: bool = True,
                flops: float | None = None, reference=None,
                reference_specs=None) -> path_choice.Choice:
        """The site's path (see :func:`path_choice.choose`; ``check``: the candidates compute
        the same function of the same arguments, so each is checked on the device; ``flops``:
        the forward's work, for how many input sets the timing needs; ``reference``: the dense
        program's own product on ``reference_specs``, timed as the baseline, never chosen).
        Differentiated, every candidate and the reference are timed with their backward."""
        pass_kind = "fwd+bwd" if differentiated() else "fwd"
        if pass_kind == "fwd+bwd":
            candidates = [c if c.unsupported else dataclasses.replace(c, fn=with_backward(c.fn))
                          for c in candidates]
            if reference is not None:
                reference = dataclasses.replace(reference, fn=with_backward(reference.fn))
        choice = path_choice.choose(op, f"{signature},{pass_kind}", candidates, arg_specs,
                                    baseline=baseline, check=check, flops=flops,
                                    reference=reference, reference_specs=reference_specs)
        if not hasattr(self, "choices"):
            self.choices = {}
        self.choices[key] = choice
        return choice

    def chosen_path(self, key) -> str | None:
        choice = getattr(self, "choices", {}).get(key)
        return None if choice is None else choice.summary()
