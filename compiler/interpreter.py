"""The rewriting interpreter: evaluates a jaxpr, letting passes replace what they own.

Run under ``jax.make_jaxpr`` it *emits* a new jaxpr, so a rewrite costs one
Python walk per input signature and nothing per step. Equations that touch no
parameter ref and contain no hooked equation are bound unchanged. Higher-order
primitives that do are re-expressed through their public APIs (``lax.scan``,
``lax.while_loop``, ``lax.switch``, ``jax.checkpoint``) around a recursive walk
of their bodies, so parameter refs (pytrees) travel into bodies as ordinary
operands and scans slice stacked weights and their state together.

Eqns are named by *keys*: tuples such as ``(3, "jaxpr", 5)`` (eqn 5 of the body
of the scan that is eqn 3 of the top-level jaxpr). Analysis and rewrite walk the
same cached jaxpr, so a key found by one names the same eqn in the other.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Sequence

import jax
from jax import lax
from jax.extend import core as jex_core

from sparsejax.compiler import views
from sparsejax.compiler.param_ref import is_ref, materialize
from sparsejax.compiler.scan_params import scan_layout

Key = tuple
SiteFn = Callable[["Interpreter", Any, Key, list, "Scope"], list]
HookFn = Callable[[Any, list], list]

SITE_PRIMITIVES = frozenset({"dot_general", "conv_general_dilated"})
_INLINE = frozenset({"jit", "pjit", "closed_call", "core_call"})
_CUSTOM = frozenset({"custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"})
_REMAT = frozenset({"checkpoint", "remat2", "remat"})


@dataclasses.dataclass(frozen=True)
class Scope:
    """Where an eqn sits: the loops around it and how often they run it."""

    loops: tuple[tuple[str, int | None], ...] = ()

    def enter(self, kind: str, trips: int | None) -> "Scope":
        return Scope(self.loops + ((kind, trips),))

    @property
    def trips(self) -> int:
        """Times the eqn runs per call; loops of unknown length count once."""
        total = 1
        for _, n in self.loops:
            total *= n or 1
        return total

    @property
    def exact(self) -> bool:
        return all(n is not None for _, n in self.loops)

    def describe(self) -> str:
        return ">".join(f"{k}[{n if n is not None else '?'}]" for k, n in self.loops) or "top"


def bind_eqn(eqn, invals: Sequence[Any]) -> list:
    """Binds ``eqn``'s primitive to plain values, as ``jax.core.eval_jaxpr`` does."""
    bind_params = eqn.primitive.get_bind_params(eqn.params)
    # JAX < 0.7 returned (subfuns, params); later versions return params alone.
    subfuns, bind_params = bind_params if isinstance(bind_params, tuple) else ((), bind_params)
    ctx = getattr(getattr(eqn, "ctx", None), "manager", None) or contextlib.nullcontext()
    with ctx:
        out = eqn.primitive.bind(*subfuns, *invals, **bind_params)
    return list(out) if eqn.primitive.multiple_results else [out]


class Interpreter:
    """Evaluates jaxprs, delegating weight sites and hooked eqns to passes.

    Args:
      on_site: called for a dot_general / conv whose operand is a ParamRef;
        returns the eqn's output values.
      hooks: eqn key -> function(eqn, outvals) -> new outvals (activation passes).
      observe: optional function(eqn, key, invals, outvals), called for every eqn bound
        as it is (with refs materialized): what analyses use to see other uses of weights.
      input_hooks: eqn key -> function(eqn, invals, state) -> new invals, applied before
        the eqn (an activation threshold on the input of a matmul).
      hook_state: eqn key -> the state its input hook reads: an array with one leading
        axis per scan around the eqn (per-layer thresholds); scans slice it per
        iteration, as they slice stacked weights.

    Values a hook passes to :meth:`emit` are collected in ``sink`` (key -> value); inside
    a scan they come out stacked along a leading axis per scan (indexed like the scan's
    ``xs``: per layer for a layer stack).
    """

    def __init__(self, on_site: SiteFn, hooks: dict[Key, HookFn] | None = None,
                 observe: Callable | None = None, input_hooks: dict[Key, Callable] | None = None,
                 hook_state: dict[Key, Any] | None = None):
        self.on_site = on_site
        self.observe = observe
        self.hooks = dict(hooks or {})
        self.input_hooks = dict(input_hooks or {})
        self.hook_state = dict(hook_state or {})
        self._hooked_prefixes = {k[:i] for k in [*self.hooks, *self.input_hooks]
                                 for i in range(1, len(k))}
        self.notes: dict[Key, str] = {}
        self.sink: dict[Key, Any] = {}
        self._envs: list[dict] = []      # the environments of the jaxprs being walked, innermost last

    def value_of(self, var, default: Any = None) -> Any:
        """The value ``var`` holds so far in the innermost jaxpr being walked (``default`` if
        it is not defined yet): what a site that computes later eqns early (sibling fusion)
        reads their operands from."""
        if isinstance(var, jex_core.Literal):
            return var.val
        return self._envs[-1].get(var, default) if self._envs else default

    def deferred_value(self, var) -> Callable[[], Any]:
        """A thunk that reads ``var`` from the innermost jaxpr being walked now, when it is
        called later in the same walk: a value after its hooks (an eqn's output hook runs
        after the eqn's own site has returned)."""
        env = self._envs[-1]
        return lambda: env[var]

    def emit(self, key: Key, value: Any) -> None:
        """Hands a value computed at ``key`` out of the program (see the class docstring)."""
        self.sink[key] = value

    # -- the walk --------------------------------------------------------------

    def run(self, jaxpr, consts: Sequence[Any], args: Sequence[Any],
            prefix: Key = (), scope: Scope = Scope()) -> list:
        env: dict[Any, Any] = {}

        def read(v):
            return v.val if isinstance(v, jex_core.Literal) else env[v]

        for v, x in zip(jaxpr.constvars, consts):
            env[v] = x
        for v, x in zip(jaxpr.invars, args):
            env[v] = x
        self._envs.append(env)
        try:
            for i, eqn in enumerate(jaxpr.eqns):
                key = prefix + (i,)
                invals = [read(v) for v in eqn.invars]
                if key in self.input_hooks:
                    invals = self.input_hooks[key](eqn, invals, self.hook_state.get(key))
                outvals = self._eval_eqn(eqn, key, invals, scope)
                if key in self.hooks:
                    outvals = self.hooks[key](eqn, outvals)
                for v, x in zip(eqn.outvars, outvals):
                    if not isinstance(v, jex_core.DropVar):
                        env[v] = x
            return [materialize(read(v)) for v in jaxpr.outvars]
        finally:
            self._envs.pop()

    def _eval_eqn(self, eqn, key: Key, invals: list, scope: Scope) -> list:
        has_ref = any(is_ref(x) for x in invals)
        name = eqn.primitive.name
        view_of = views.view_operand(eqn, invals) if has_ref else None
        if view_of is not None:
            return [views.apply_view(eqn, invals[view_of], invals[:view_of] + invals[view_of + 1:])]
        if has_ref and name in SITE_PRIMITIVES:
            return self.on_site(self, eqn, key, invals, scope)
        if has_ref or key in self._hooked_prefixes:
            handler = _HIGHER_ORDER.get(name)
            if handler is not None:
                return handler(self, eqn, key, invals, scope)
        outvals = bind_eqn(eqn, [materialize(x) for x in invals])
        if self.observe is not None:
            self.observe(eqn, key, invals, outvals)
        return outvals

    # -- higher-order primitives ----------------------------------------------

    def _inline(self, eqn, key, invals, scope):
        closed = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
        jaxpr, consts = _open(closed)
        return self.run(jaxpr, consts, invals, key + ("jaxpr",), scope)

    def _custom(self, eqn, key, invals, scope):
        jaxpr, consts = _open(eqn.params["call_jaxpr"])
        if key not in self._hooked_prefixes and not _has_site(jaxpr):
            # Nothing in the body can be rewritten (a weight read by a gather, say): the
            # call keeps its own derivative rule, fed the weights' current values.
            return bind_eqn(eqn, [materialize(x) for x in invals])
        # A custom derivative rule was written for the original body; once the body is
        # rewritten, autodiff of the rewritten body is the only rule that stays correct.
        self.notes[key] = (f"{eqn.primitive.name} '{eqn.params.get('name', '')}' inlined: "
                           "its custom derivative is replaced by autodiff of the rewritten body")
        return self.run(jaxpr, consts, invals, key + ("call_jaxpr",), scope)

    def _scan(self, eqn, key, invals, scope):
        p = eqn.params
        jaxpr, consts = _open(p["jaxpr"])
        n_consts, n_carry, length, reverse, unroll = scan_layout(eqn)
        scan_consts = invals[:n_consts]
        init = [materialize(x) for x in invals[n_consts:n_consts + n_carry]]
        xs = invals[n_consts + n_carry:]
        body_scope = scope.enter("scan", length)
        states = self._states_under(key + ("jaxpr",))

        def body(carry, sliced):
            x_slices, state_slices = sliced
            x_slices = [x.after_leading_slice() if is_ref(x) else x for x in x_slices]
            with self._inner(state_slices) as inner:
                outs = self.run(jaxpr, consts, [*scan_consts, *carry, *x_slices],
                                key + ("jaxpr",), body_scope)
            return outs[:n_carry], (outs[n_carry:], inner)

        scan = lambda xs: lax.scan(body, init, (xs, states), length=length, reverse=reverse,
                                   unroll=unroll)
        xs = self._hoist_before_scan(xs, key + ("jaxpr",), scan)
        carry, (ys, emitted) = scan(xs)
        self.sink.update(emitted)    # stacked like xs (a reverse scan's too): per layer
        return [*carry, *ys]

    def _hoist_before_scan(self, xs: list, body_key: Key, scan: Callable) -> list:
        """``xs`` with the stacked weights whose handler would rather have them dense before
        the scan materialized (``handler.hoist_before_scan(ref, body_key)``, asked after the
        body's sites chose their paths, where ``handler.may_hoist_before_scan()``): one
        computation for every layer instead of one per layer inside the body, whose sites
        then see plain weights.

        The sites choose in a first trace of the scan that is only evaluated for its shapes
        (``jax.eval_shape``: nothing of it enters the program); a handler whose every site in
        the body chose to rebuild the dense weight says yes."""
        asks = [i for i, x in enumerate(xs)
                if is_ref(x) and getattr(x.handler, "may_hoist_before_scan", lambda: False)()]
        if not asks:
            return xs
        jax.eval_shape(lambda: scan(xs))
        hoisted = {i for i in asks if xs[i].handler.hoist_before_scan(xs[i], body_key)}
        if hoisted:
            self.notes[body_key[:-1]] = ("dense weights rebuilt once for every layer before the "
                                         "scan: " + ", ".join(xs[i].path for i in sorted(hoisted)))
        return [materialize(x) if i in hoisted else x for i, x in enumerate(xs)]

    def _states_under(self, prefix: Key) -> dict:
        return {k: v for k, v in self.hook_state.items() if k[:len(prefix)] == prefix}

    @contextlib.contextmanager
    def _inner(self, state_slices: dict):
        """A loop body's walk: its hooks read ``state_slices``; yields the body's emitted values."""
        saved_state = {k: self.hook_state[k] for k in state_slices}
        outer, self.sink = self.sink, {}
        inner: dict = {}
        self.hook_state.update(state_slices)
        try:
            yield inner
        finally:
            inner.update(self.sink)
            self.sink = outer
            self.hook_state.update(saved_state)

    def _while(self, eqn, key, invals, scope):
        p = eqn.params
        cond_jaxpr, cond_consts_closed = _open(p["cond_jaxpr"])
        body_jaxpr, body_consts_closed = _open(p["body_jaxpr"])
        nc, nb = p["cond_nconsts"], p["body_nconsts"]
        cond_consts, body_consts = invals[:nc], invals[nc:nc + nb]
        init = [materialize(x) for x in invals[nc + nb:]]
        body_scope = scope.enter("while", None)

        def cond_fun(carry):
            return self.run(cond_jaxpr, cond_consts_closed, [*cond_consts, *carry],
                            key + ("cond_jaxpr",), scope)[0]

        def body_fun(carry):
            with self._inner({}) as emitted:
                out = self.run(body_jaxpr, body_consts_closed, [*body_consts, *carry],
                               key + ("body_jaxpr",), body_scope)
            _refuse_emitted(emitted, "a lax.while_loop body")
            return out

        return list(lax.while_loop(cond_fun, body_fun, init))

    def _cond(self, eqn, key, invals, scope):
        index, operands = invals[0], invals[1:]

        def branch_fn(j, closed):
            jaxpr, consts = _open(closed)

            def branch(ops):
                with self._inner({}) as emitted:
                    out = self.run(jaxpr, consts, ops, key + (f"branches{j}",), scope)
                _refuse_emitted(emitted, "a lax.cond / lax.switch branch")
                return out
            return branch

        fns = [branch_fn(j, br) for j, br in enumerate(eqn.params["branches"])]
        return list(lax.switch(index, fns, list(operands)))

    def _remat(self, eqn, key, invals, scope):
        jaxpr, consts = _open(eqn.params["jaxpr"])
        states = self._states_under(key + ("jaxpr",))

        def body(ops, state):
            with self._inner(state) as inner:
                outs = self.run(jaxpr, consts, ops, key + ("jaxpr",), scope)
            return outs, inner    # emitted values leave the checkpoint as its outputs

        fn = jax.checkpoint(body, prevent_cse=eqn.params.get("prevent_cse", True),
                            policy=eqn.params.get("policy"))
        outs, emitted = fn(list(invals), states)
        self.sink.update(emitted)
        return list(outs)


def _open(closed_or_open) -> tuple[Any, Sequence[Any]]:
    if hasattr(closed_or_open, "consts") and hasattr(closed_or_open, "jaxpr"):
        return closed_or_open.jaxpr, closed_or_open.consts
    return closed_or_open, ()


_HIGHER_ORDER: dict[str, Callable] = {
    **{n: Interpreter._inline for n in _INLINE},
    **{n: Interpreter._custom for n in _CUSTOM},
    **{n: Interpreter._remat for n in _REMAT},
    "scan": Interpreter._scan,
    "while": Interpreter._while,
    "cond": Interpreter._cond,
}


def sub_jaxprs(eqn) -> list[tuple[str, Any]]:
    """The (name, open jaxpr) pairs an eqn holds, keyed as the interpreter keys them."""
    p, name = eqn.params, eqn.primitive.name
    if name == "cond":
        return [(f"branches{j}", _open(b)[0]) for j, b in enumerate(p["branches"])]
    if name == "while":
        return [("cond_jaxpr", _open(p["cond_jaxpr"])[0]), ("body_jaxpr", _open(p["body_jaxpr"])[0])]
    if name in _CUSTOM:
        return [("call_jaxpr", _open(p["call_jaxpr"])[0])]
    if name in _INLINE or name in _REMAT or name == "scan":
        inner = p.get("jaxpr", p.get("call_jaxpr"))
        return [("jaxpr", _open(inner)[0])] if inner is not None else []
    return []


def _has_site(jaxpr) -> bool:
    """Whether ``jaxpr`` or any jaxpr nested in it holds a matmul or convolution."""
    return any(eqn.primitive.name in SITE_PRIMITIVES
               or any(_has_site(inner) for _, inner in sub_jaxprs(eqn))
               for eqn in jaxpr.eqns)


def _refuse_emitted(emitted: dict, where: str) -> None:
    """Values handed out of the program leave through scans only (stacked per layer)."""
    if emitted:
        keys = ", ".join("/".join(map(str, k)) for k in emitted)
        raise ValueError(f"a value handed out of the program (e.g. with_aux's activation L1) is "
                         f"computed inside {where} at eqn {keys}: only scans (and the top level) "
                         "can hand values out; select sites outside the loop or branch")
