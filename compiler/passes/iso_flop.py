"""The Sparse-IFT pass: Sparse Wide, Parallel, Factorized and Doped weights.

Sparse Parallel / Factorized / Doped replace one ``(K, N)`` weight by masked factors
(:mod:`sparsejax.iso_flop`), which enter the program in its place as a factorized
ref does (``factorized.py``): a direct site computes ``x @ W`` from the factors, any
other use materializes the dense matrix. Masks (one per masked factor, ``None`` for
a dense one) live in ``sstate["masks"]`` beside the factors and are applied where the
leaf enters, so pruned entries get no gradient.

Sparse Wide changes the program's shapes: at each FFN the compiler finds, up and
gate gain output units and down the same input units. The widened leaves enter
masked, their sites bind the model's own dot on the wider weight, and the hidden
values between (the model's activation code, bound again on the wider values) flow
to down, which contracts them back to the model width. That is right only when
every op between up/gate and down is elementwise with scalar constants, so
``bind_program`` checks exactly that, and that one SparseWide rule of one sparsity
covers all of the FFN's weights; calls in that region (``jax.nn.silu`` is a jit) are
inlined by :func:`program_hooks` so their bodies bind on the wider values too.
"""

from __future__ import annotations

import math

import jax
from jax.extend import core as jex_core

from sparsejax import iso_flop
from sparsejax import masks as mask_math
from sparsejax.compiler.activation_sites import _CALLS, _ELEMENTWISE
from sparsejax.compiler.interpreter import bind_eqn, sub_jaxprs
from sparsejax.compiler.param_ref import ParamRef, materialize
from sparsejax.compiler.passes.base import WeightHandler, direct_site_reason, matmul_at_site
from sparsejax.compiler.passes.factorized import FactorizedHandler
from sparsejax.layout import WeightLayout
from sparsejax.rules import SparseDoped, SparseFactorized, SparseParallel, SparseWide

_KIND = {SparseParallel: "parallel", SparseFactorized: "factorized", SparseDoped: "doped"}
_DESCRIBE = {"parallel": "sparse branches summed, one XLA dot",
             "factorized": "sparse U then sparse V", "doped": "dense U·V plus sparse S"}


class IsoFlopFactorsHandler(FactorizedHandler):
    """Sparse Parallel / Factorized / Doped on one leaf (materialize is the factorized one)."""

    def __init__(self, rule, path, layout, sites):
        WeightHandler.__init__(self, rule, path, rule.check_layout(path, layout), sites)
        self.kind_name = _KIND[type(rule)]
        self.kind = self   # FactorizedHandler.materialize calls self.kind.to_dense
        self._reasons = {s.key: self.site_reason(s) for s in sites}

    def to_dense(self, factors, k, n):
        return iso_flop.to_dense(self.kind_name, factors)

    def may_hoist_before_scan(self) -> bool:
        return False      # one fixed path per site: nothing chosen to rebuild the weight

    def init(self, leaf, key):
        factors, masks = iso_flop.init_factors(self.kind_name, key, self.layout.to_matrix(leaf),
                                               self.rule.sparsity)
        self._factor_ndim = jax.tree.leaves(factors)[0].ndim
        return jax.tree.map(lambda f: f.astype(leaf.dtype), factors), masks

    def make_input(self, item, mask) -> ParamRef:
        if mask is None:
            raise ValueError(f"{self.path}: {self.rule.describe()}: sstate['masks'] lacks the "
                             "masks of its factors; pass the sstate returned by init")
        state = {name: f if mask.get(name) is None else mask_math.apply_mask(f, mask[name])
                 for name, f in item.items()}
        return ParamRef.for_leaf(self.path, None, len(self.layout.shape), state=state, handler=self)

    def site_path(self, key) -> str:
        reason = self._reasons.get(key)
        return f"dense fallback ({reason})" if reason else _DESCRIBE[self.kind_name]

    def on_site(self, interp, eqn, key, invals, scope):
        operand = 0 if isinstance(invals[0], ParamRef) else 1
        ref = invals[operand]
        if self._dense_fallback(key, ref):
            return bind_eqn(eqn, [materialize(x) for x in invals])
        return matmul_at_site(eqn, operand, invals[1 - operand],
                              lambda x2: iso_flop.matmul(self.kind_name, x2, ref.state))

    def params_after(self, density):
        k, n, s = self.layout.k, self.layout.n, self.rule.sparsity
        stack = math.prod(self.layout.stack_shape)
        return stack * iso_flop.multiply_adds(self.kind_name, k, n, s)

    def flops_after(self, site, density):
        k, n = self.layout.k, self.layout.n
        tokens = site.flops // (2 * k * n)
        return 2 * tokens * iso_flop.multiply_adds(self.kind_name, k, n, self.rule.sparsity)


# --------------------------------------------------------------------------- Sparse Wide


class SparseWideHandler(WeightHandler):
    """One up, gate or down weight of an FFN widened by Sparse Wide."""

    def __init__(self, rule, path, layout, sites):
        super().__init__(rule, path, rule.check_layout(path, layout), sites)
        for site in sites:
            reason = direct_site_reason(site, self.layout)
            if reason is not None:
                raise rule.error(path, f"cannot widen this weight: {reason}")
        self.axis = None   # "k" (down) or "n" (up, gate): set by bind_program

    def bind_program(self, traced, slots) -> None:
        """Finds this weight's FFN and checks that the whole FFN can be widened."""
        ffn = _ffn_of(self.path, traced.activation_sites)
        if ffn is None:
            found = [list(s.paths) for s in traced.activation_sites if s.kind == "ffn"]
            raise self.rule.error(self.path, "is not an up, gate or down weight of an FFN the "
                                  "compiler found, so it has no hidden width to widen; FFN "
                                  f"weights found: {found[:4] if found else 'none'}")
        rules = {s.path: s.rule for s in slots}
        for other in ffn.paths:
            rule = rules.get(other)
            if not isinstance(rule, SparseWide) or rule.sparsity != self.rule.sparsity:
                raise self.rule.error(self.path, f"its FFN's weight {other} has "
                                      f"{rule.describe() if rule else 'no rule'}; up, gate and "
                                      "down must be widened together by one sparsity")
        self.axis = "k" if self.path == ffn.paths[-1] else "n"
        _wide_region(traced.closed.jaxpr, traced.sites, ffn.paths, self.rule)   # raises if not

    def _wide_layout(self) -> WeightLayout:
        axis = (self.layout.contract_axes if self.axis == "k" else self.layout.free_axes)[0]
        shape = list(self.layout.shape)
        shape[axis] = iso_flop.wide_width(shape[axis], self.rule.sparsity)
        lay = self.layout
        return WeightLayout(tuple(shape), lay.stack_axes, lay.contract_axes, lay.free_axes)

    def init(self, leaf, key):
        if self.axis is None:
            raise RuntimeError(f"{self.path}: SparseWide needs bind_program before init")
        wide, mask = iso_flop.widen_init(key, self.layout.to_matrix(leaf), self.axis,
                                         self.rule.sparsity)
        self.wide_layout = self._wide_layout()
        return self.wide_layout.from_matrix(wide).astype(leaf.dtype), \
            self.wide_layout.from_matrix(mask)

    @property
    def size(self) -> int:
        return math.prod(self.wide_layout.shape)

    def make_input(self, item, mask) -> ParamRef:
        if mask is None:
            raise ValueError(f"{self.path}: {self.rule.describe()}: sstate['masks'] needs the "
                             f"widened mask of shape {self.wide_layout.shape}")
        value = mask_math.apply_mask(item, mask)
        return ParamRef.for_leaf(self.path, value, item.ndim, mask=mask, handler=self)

    def site_path(self, key) -> str:
        return f"XLA dot, widened to {self.wide_layout.describe()}"

    def flops_after(self, site, density):
        # The wide mask keeps K·N entries per matrix (iso_flop.widen_init): the dense count.
        return 2 * (site.flops // (2 * self.layout.k * self.layout.n)) * self.layout.k * self.layout.n

    def params_after(self, density):
        return math.prod(self.wide_layout.stack_shape) * self.layout.k * self.layout.n


def _ffn_of(path, activation_sites):
    return next((s for s in activation_sites if s.kind == "ffn" and path in s.paths), None)


def _jaxpr_at(jaxpr, prefix):
    """The (open) jaxpr an eqn key's prefix points into: ``(5, "jaxpr", 2, "jaxpr")``."""
    for index, name in zip(prefix[::2], prefix[1::2]):
        jaxpr = dict(sub_jaxprs(jaxpr.eqns[index]))[name]
    return jaxpr


def _wide_region(jaxpr, weight_sites, ffn_paths, rule) -> list:
    """Checks that the FFN's hidden values can be widened; returns the keys of the bodies of
    call eqns in the region (to inline). Raises a one-line ValueError naming the rule otherwise."""
    sites = [s for s in weight_sites if s.path in ffn_paths]
    prefixes = {s.key[:-1] for s in sites}
    down = ffn_paths[-1]
    fail = lambda why: rule.error(down, f"cannot widen this FFN: {why}")
    if len(prefixes) != 1 or len(sites) != len(ffn_paths) or \
            len({s.path for s in sites}) != len(ffn_paths):
        raise fail("its weights are used in more than one place (each must have one matmul)")
    prefix = prefixes.pop()
    body = _jaxpr_at(jaxpr, prefix)
    ups = {s.key[-1] for s in sites if s.path != down}
    (down_index,) = [s.key[-1] for s in sites if s.path == down]
    tainted = set()
    for i in ups:
        tainted.update(body.eqns[i].outvars)
    calls: list = []
    for i, eqn in enumerate(body.eqns):
        if i in ups or i == down_index:
            continue
        if any(isinstance(v, jex_core.Var) and v in tainted for v in eqn.invars):
            _check_elementwise(eqn, tainted, prefix + (i,), calls, fail)
            tainted.update(eqn.outvars)
    if not any(isinstance(v, jex_core.Var) and v in tainted for v in body.eqns[down_index].invars):
        raise fail("the down projection does not read the hidden values")
    escaped = [v for v in body.outvars if isinstance(v, jex_core.Var) and v in tainted]
    if escaped:
        raise fail("hidden values leave the FFN (returned or used after the down projection)")
    return calls


def _check_elementwise(eqn, tainted, key, calls, fail) -> None:
    name = eqn.primitive.name
    if name in _CALLS:
        inner_name, inner = sub_jaxprs(eqn)[0]
        inner_tainted = {v for v, o in zip(inner.invars, eqn.invars)
                         if isinstance(o, jex_core.Var) and o in tainted}
        calls.append(key + (inner_name,))
        for j, e in enumerate(inner.eqns):
            if any(isinstance(v, jex_core.Var) and v in inner_tainted for v in e.invars):
                _check_elementwise(e, inner_tainted, key + (inner_name, j), calls, fail)
                inner_tainted.update(e.outvars)
            elif any(getattr(v.aval, "shape", ()) for v in e.outvars):
                raise fail(f"`{e.primitive.name}` inside `{name}` builds a non-scalar constant "
                           "of the hidden values' shape")
        return
    if name not in _ELEMENTWISE:
        raise fail(f"`{name}` between up/gate and down is not elementwise")
    for v in eqn.invars:
        if not (isinstance(v, jex_core.Var) and v in tainted) and getattr(v.aval, "shape", ()):
            raise fail(f"`{name}` combines the hidden values with a {v.aval.shape} value that "
                       "does not depend on the input (a bias or per-unit scale)")


def _identity(eqn, outvals):
    return outvals


def program_hooks(handlers, traced) -> dict:
    """Hooks that make the interpreter inline the calls inside widened FFN regions
    (a hook on a call's first inner eqn inlines it: the identity changes nothing else)."""
    hooks, done = {}, set()
    for handler in handlers:
        if not isinstance(handler, SparseWideHandler):
            continue
        ffn = _ffn_of(handler.path, traced.activation_sites)
        if ffn is None or ffn.paths in done:
            continue
        done.add(ffn.paths)
        for call_body in _wide_region(traced.closed.jaxpr, traced.sites, ffn.paths, handler.rule):
            hooks.setdefault(call_body + (0,), _identity)
    return hooks
