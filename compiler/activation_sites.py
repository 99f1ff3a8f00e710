"""Activation sites, found by the structure of the program, not by module names.

* An **FFN site** is the elementwise region between up/gate projections and a
  down projection: a weight site D whose activation operand is computed only by
  elementwise and layout ops (slices, reshapes) from outputs of other weight
  sites (the up/gate projections, or one fused projection whose output is
  sliced into gate and up), plus values that do not depend on the activations
  at all (biases, scales, constants). The *pre-activation* is the value the
  nonlinearity reads on the gate branch (after the bias add): Spark and
  Gemma 3n sparsify it there.
* An **attention site** is a dot_general between two activations whose output,
  through elementwise ops (scaling, tanh soft-caps, ``where`` masks) and layout
  ops (the transpose an einsum such as ``'BTNH,BSNH->BTNS'`` adds), reaches a
  ``reduce_max`` over its last axis followed by ``exp``: the softmax over keys.
  The site is the softmax's input, one row of scores per query.

What is a constant is decided by data flow (does the value depend on a
non-parameter input of the function?), never by shapes, so sites are found the
same way at every batch size and sequence length, one token included. Both
kinds are keyed like the interpreter keys eqns, so a pass can hook their outputs.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from typing import Any, Sequence

from jax.extend import core as jex_core

from sparsejax.compiler.interpreter import Key, Scope, sub_jaxprs
from sparsejax.compiler.scan_params import scan_layout
from sparsejax.compiler.sites import WeightSite

# Elementwise ops that are linear in their activation input (given constant other operands).
_LINEAR = {"add", "sub", "neg", "convert_element_type", "mul", "div", "copy", "copy_p",
           "reduce_precision", "stop_gradient", "add_any"}
# Elementwise nonlinearities: where an FFN's activation function lives.
_NONLINEAR = {"tanh", "logistic", "erf", "erfc", "exp", "exp2", "expm1", "log", "log1p", "max", "min",
              "integer_pow", "pow", "sqrt", "rsqrt", "cbrt", "abs", "sign", "select_n", "clamp",
              "square", "sin", "cos", "sinh", "cosh", "atan", "erf_inv", "round", "floor", "ceil"}
_COMPARE = {"gt", "ge", "lt", "le", "eq", "ne", "and", "or", "not"}
_ELEMENTWISE = _LINEAR | _NONLINEAR | _COMPARE
_CALLS = {"jit", "pjit", "custom_jvp_call", "closed_call"}
_SHAPE_ONLY = {"reshape", "transpose", "broadcast_in_dim", "squeeze", "expand_dims",
               "convert_element_type", "copy"}
# Ops that move activations around without computing: a fused projection's output is
# sliced into gate and up, RoPE splits and concatenates, einsums transpose their results.
_LAYOUT = _SHAPE_ONLY | {"slice", "dynamic_slice", "concatenate", "rev", "pad", "copy_p",
                         "reduce_precision"}


@dataclasses.dataclass(frozen=True)
class ActivationSite:
    """A place where activations can be made top-k sparse.

    Attributes:
      kind: "ffn" or "attention".
      key: the eqn whose output is the pre-activation (FFN) or the scores (attention).
      output: which output of that eqn.
      shape: the value's shape; top-k runs over its last axis.
      scope: the loops around it (a scanned layer stack runs it once per layer).
      paths: weight paths that identify it: (gate/up..., down) for an FFN, the
        projections feeding queries and keys for attention.
      act_key, act_operand: (FFN) where the activation function's output ``act(gate)``
        is consumed: the input ``act_operand`` of eqn ``act_key`` (the product with the
        up branch in a gated FFN, the down projection otherwise). CATS thresholds and
        ReLU substitution rewrite that input.
      act_ops: (FFN) the primitives between the pre-activation and that input: the
        activation function as the program computes it.
    """

    kind: str
    key: Key
    output: int
    shape: tuple[int, ...]
    scope: Scope
    paths: tuple[str, ...]
    act_key: Key | None = None
    act_operand: int | None = None
    act_ops: tuple[str, ...] = ()

    @property
    def width(self) -> int:
        return self.shape[-1]

    @property
    def rows(self) -> int:
        return math.prod(self.shape[:-1]) * self.scope.trips

    def describe(self) -> str:
        return f"{self.kind} at {'/'.join(map(str, self.key))} ({'×'.join(map(str, self.shape))})"


def down_projection_sites(point, sites_by_path: dict) -> list:
    """The weight sites of an FFN's down projection: those of its last path (``paths[-1]``)
    in the same jaxpr (key prefix) and loops (scope) as ``point``, an :class:`ActivationSite`
    or a point placed on one (a threshold)."""
    return [s for s in sites_by_path.get(point.paths[-1], [])
            if s.key[:-1] == point.key[:-1] and s.scope == point.scope]


def _is_elementwise(eqn) -> bool:
    name = eqn.primitive.name
    if name in _ELEMENTWISE:
        return True
    if name in _CALLS:
        return all(_is_elementwise(e) or e.primitive.name in _SHAPE_ONLY
                   for _, j in sub_jaxprs(eqn) for e in j.eqns)
    return False


def _is_nonlinear(eqn) -> bool:
    name = eqn.primitive.name
    if name in _NONLINEAR:
        return True
    if name in _CALLS:
        return any(_is_nonlinear(e) for _, j in sub_jaxprs(eqn) for e in j.eqns)
    return False


def _flags(invars, dependent: set) -> list[bool]:
    return [isinstance(v, jex_core.Var) and v in dependent for v in invars]


def _dependence(jaxpr, inputs: Sequence[bool]) -> tuple[set, list[bool]]:
    """The vars of ``jaxpr`` that depend on its flagged inputs, and its outputs' flags."""
    dependent = {v for v, d in zip(jaxpr.invars, inputs) if d}
    for eqn in jaxpr.eqns:
        ins = _flags(eqn.invars, dependent)
        if any(ins):
            outs = _eqn_outputs(eqn, ins)
            dependent.update(v for v, d in zip(eqn.outvars, outs) if d)
    return dependent, _flags(jaxpr.outvars, dependent)


def _sub_inputs(eqn, ins: list[bool]) -> dict[str, list[bool]]:
    """Which inputs of each sub-jaxpr of ``eqn`` depend on the activations (loops: to a fixpoint)."""
    p, name = eqn.params, eqn.primitive.name
    subs = dict(sub_jaxprs(eqn))
    if name == "scan":
        nc, ncarry = scan_layout(eqn)[:2]
        flags = list(ins)
        while True:   # a carry depends on the activations if its init or its update does
            _, outs = _dependence(subs["jaxpr"], flags)
            carry = [a or b for a, b in zip(flags[nc:nc + ncarry], outs[:ncarry])]
            if carry == flags[nc:nc + ncarry]:
                return {"jaxpr": flags}
            flags[nc:nc + ncarry] = carry
    if name == "while":
        nc, nb = p["cond_nconsts"], p["body_nconsts"]
        carry = list(ins[nc + nb:])
        while True:
            _, outs = _dependence(subs["body_jaxpr"], [*ins[nc:nc + nb], *carry])
            new = [a or b for a, b in zip(carry, outs)]
            if new == carry:
                return {"cond_jaxpr": [*ins[:nc], *carry], "body_jaxpr": [*ins[nc:nc + nb], *carry]}
            carry = new
    if name == "cond":
        return {k: list(ins[1:]) for k in subs}
    return {k: (list(ins) if len(j.invars) == len(ins) else [any(ins)] * len(j.invars))
            for k, j in subs.items()}


def _eqn_outputs(eqn, ins: list[bool]) -> list[bool]:
    subs = dict(sub_jaxprs(eqn))
    if not subs:
        return [True] * len(eqn.outvars)
    name, sub_ins = eqn.primitive.name, _sub_inputs(eqn, ins)
    if name == "scan":
        nc, ncarry = scan_layout(eqn)[:2]
        _, outs = _dependence(subs["jaxpr"], sub_ins["jaxpr"])
        return [*sub_ins["jaxpr"][nc:nc + ncarry], *outs[ncarry:]]
    if name == "while":
        return sub_ins["body_jaxpr"][eqn.params["body_nconsts"]:]
    outs = [ins[0] if name == "cond" else False] * len(eqn.outvars)
    for k, j in subs.items():
        if k == "cond_jaxpr":
            continue
        _, sub_outs = _dependence(j, sub_ins[k])
        if len(sub_outs) != len(outs):
            return [any(ins)] * len(eqn.outvars)
        outs = [a or b for a, b in zip(outs, sub_outs)]
    return outs


class _Scope:
    """Def-use information for one jaxpr, and which of its values depend on the activations."""

    def __init__(self, jaxpr, prefix: Key, weight_sites: dict[Key, list[WeightSite]],
                 inputs: Sequence[bool]):
        self.jaxpr, self.prefix = jaxpr, prefix
        self.dependent, _ = _dependence(jaxpr, inputs)
        self.producer: dict[Any, tuple[int, int]] = {}
        self.consumers: dict[Any, list[int]] = {}
        for i, eqn in enumerate(jaxpr.eqns):
            for j, v in enumerate(eqn.outvars):
                self.producer[v] = (i, j)
            for v in eqn.invars:
                if isinstance(v, jex_core.Var):
                    self.consumers.setdefault(v, []).append(i)
        self.sites = {k[-1]: s for k, s in weight_sites.items() if k[:-1] == prefix}

    def eqn(self, i):
        return self.jaxpr.eqns[i]

    def activation_operand(self, i: int):
        site = self.sites[i][0]
        return self.eqn(i).invars[1 - site.operand]


def _ffn_site(scope: _Scope, down: int, sc: Scope) -> ActivationSite | None:
    start = scope.activation_operand(down)
    if not isinstance(start, jex_core.Var):
        return None
    region: set[int] = set()
    inputs: list[int] = []                     # eqn indices of up/gate weight sites
    frontier, seen = deque([start]), {start}
    while frontier:
        v = frontier.popleft()
        if v not in scope.dependent:
            continue                           # a bias, a scale, a constant: not activations
        if v not in scope.producer:
            return None                        # activations from outside: not a closed region
        i, _ = scope.producer[v]
        eqn = scope.eqn(i)
        if i in scope.sites:
            inputs.append(i)
            continue
        if not (_is_elementwise(eqn) or eqn.primitive.name in _LAYOUT):
            return None
        region.add(i)
        for u in eqn.invars:
            if isinstance(u, jex_core.Var) and u not in seen:
                seen.add(u)
                frontier.append(u)
    if not inputs:
        return None
    # The gate is the projection whose output reaches a nonlinearity through linear ops.
    candidates = []
    for i in sorted(set(inputs)):
        pre = _pre_activation(scope, scope.eqn(i).outvars[0], region)
        if pre is not None:
            candidates.append((i, pre))
    if len(candidates) != 1:
        return None
    gate, pre_var = candidates[0]
    p_eqn, p_out = scope.producer[pre_var]
    ups = [scope.sites[i][0].path for i in sorted(set(inputs))]
    act_key, act_operand, act_ops = _activation_output(scope, pre_var, set(inputs), region, down)
    return ActivationSite("ffn", scope.prefix + (p_eqn,), p_out, tuple(pre_var.aval.shape), sc,
                          (*ups, scope.sites[down][0].path), act_key, act_operand, act_ops)


def _activation_output(scope: _Scope, pre_var, inputs: set[int], region: set[int], down: int):
    """(key, operand, ops) of the input where the gate branch's activation is consumed.

    The gate branch is what the pre-activation reaches in the region; the up branch is what
    the projections' outputs reach without passing through the pre-activation (a fused
    gate/up projection's up half included). The first region eqn that reads one value of
    each is the product ``act(gate) * up``; with none (no up branch) it is the down site.
    """
    def reach(starts, blocked):
        seen, frontier = set(), deque(v for v in starts if v not in blocked)
        seen.update(frontier)
        while frontier:
            v = frontier.popleft()
            for i in scope.consumers.get(v, []):
                if i not in region:
                    continue
                for w in scope.eqn(i).outvars:
                    if w not in seen and w not in blocked:
                        seen.add(w)
                        frontier.append(w)
        return seen

    gate = reach([pre_var], set())
    up = reach([scope.eqn(i).outvars[0] for i in inputs], {pre_var})
    ops = []
    for i in sorted(region):
        eqn = scope.eqn(i)
        ins = [v if isinstance(v, jex_core.Var) else None for v in eqn.invars]
        g = [j for j, v in enumerate(ins) if v is not None and v in gate and v not in up]
        u = [j for j, v in enumerate(ins) if v is not None and v in up]
        if g and u:
            return scope.prefix + (i,), g[0], tuple(ops)
        if g:
            ops.append(eqn.primitive.name)
    return scope.prefix + (down,), 1 - scope.sites[down][0].operand, tuple(ops)


def _pre_activation(scope: _Scope, u, region: set[int]):
    """The first value on ``u``'s linear path that a nonlinearity reads, or None.

    The path runs through linear ops and layout ops (a fused gate/up projection is
    sliced before its gate half meets the nonlinearity).
    """
    frontier, seen = deque([u]), {u}
    while frontier:
        v = frontier.popleft()
        for i in sorted(scope.consumers.get(v, [])):
            if i not in region:
                continue
            eqn = scope.eqn(i)
            if _is_nonlinear(eqn):
                return v
            if eqn.primitive.name in _LINEAR or eqn.primitive.name in _LAYOUT:
                for w in eqn.outvars:
                    if w not in seen:
                        seen.add(w)
                        frontier.append(w)
    return None


def _attention_site(scope: _Scope, i: int, sc: Scope) -> ActivationSite | None:
    eqn = scope.eqn(i)
    out = eqn.outvars[0]
    if len(out.aval.shape) < 2:
        return None
    size = math.prod(out.aval.shape)
    frontier, seen = deque([out]), {out}
    softmax_input = None
    while frontier and softmax_input is None:
        v = frontier.popleft()
        last = len(v.aval.shape) - 1
        for j in sorted(scope.consumers.get(v, [])):
            e = scope.eqn(j)
            if e.primitive.name == "reduce_max" and tuple(e.params["axes"]) == (last,):
                if _reaches_exp(scope, v):
                    softmax_input = v
                    break
            elif _is_elementwise(e) or e.primitive.name in _SHAPE_ONLY:
                # scores keep their size through scaling, soft-caps, masks and transposes
                for w in e.outvars:
                    if w not in seen and math.prod(w.aval.shape) == size:
                        seen.add(w)
                        frontier.append(w)
    if softmax_input is None or softmax_input not in scope.producer:
        return None
    p_eqn, p_out = scope.producer[softmax_input]
    return ActivationSite("attention", scope.prefix + (p_eqn,), p_out,
                          tuple(softmax_input.aval.shape), sc, _feeding_paths(scope, i))


def _reaches_exp(scope: _Scope, v) -> bool:
    return any(scope.eqn(j).primitive.name == "exp" or
               (scope.eqn(j).primitive.name == "sub" and any(
                   scope.eqn(k).primitive.name == "exp"
                   for w in scope.eqn(j).outvars for k in scope.consumers.get(w, [])))
               for j in scope.consumers.get(v, []))


def _feeding_paths(scope: _Scope, i: int) -> tuple[str, ...]:
    """Weight paths reached backwards from eqn ``i``'s operands through one-input ops."""
    paths: list[str] = []
    frontier = deque(v for v in scope.eqn(i).invars if isinstance(v, jex_core.Var))
    seen = set(frontier)
    while frontier:
        v = frontier.popleft()
        if v not in scope.producer:
            continue
        j, _ = scope.producer[v]
        if j in scope.sites:
            paths.extend(s.path for s in scope.sites[j] if s.path not in paths)
            continue
        e = scope.eqn(j)
        if e.primitive.name in _LAYOUT or _is_elementwise(e):
            for u in e.invars:
                if isinstance(u, jex_core.Var) and u not in seen:
                    seen.add(u)
                    frontier.append(u)
    return tuple(paths)


def find_activation_sites(jaxpr, weight_sites: Sequence[WeightSite],
                          n_params: int) -> list[ActivationSite]:
    """Every FFN and attention site of ``jaxpr`` (an open Jaxpr), in program order.

    The first ``n_params`` inputs of ``jaxpr`` are parameters; the others carry the
    activations (values computed from parameters alone count as constants).
    """
    by_key: dict[Key, list[WeightSite]] = {}
    for s in weight_sites:
        by_key.setdefault(s.key, []).append(s)
    found: list[ActivationSite] = []

    def walk(j, prefix: Key, sc: Scope, inputs: Sequence[bool]):
        scope = _Scope(j, prefix, by_key, inputs)
        for i, eqn in enumerate(j.eqns):
            if i in scope.sites:
                site = _ffn_site(scope, i, sc)
                if site is not None:
                    found.append(site)
            elif eqn.primitive.name == "dot_general":
                site = _attention_site(scope, i, sc)
                if site is not None:
                    found.append(site)
            subs = sub_jaxprs(eqn)
            sub_inputs = _sub_inputs(eqn, _flags(eqn.invars, scope.dependent)) if subs else {}
            for name, sub in subs:
                inner = sc
                if eqn.primitive.name == "scan":
                    inner = sc.enter("scan", scan_layout(eqn).length)
                elif name == "body_jaxpr":
                    inner = sc.enter("while", None)
                walk(sub, prefix + (i, name), inner, sub_inputs[name])

    walk(jaxpr, (), Scope(), [i >= n_params for i in range(len(jaxpr.invars))])
    unique = {(s.kind, s.key, s.output): s for s in found}
    return list(unique.values())
