"""Activation sites, found by the structure of the program, not by module names.

* An **FFN site** is the elementwise region between up/gate projections and a
  down projection: a weight site D whose activation operand is computed only by
  elementwise ops from outputs of other weight sites (the up/gate projections),
  plus constants such as biases. The *pre-activation* is the value the
  nonlinearity reads on the gate branch (after the bias add): Spark and
  Gemma 3n sparsify it there.
* An **attention site** is a dot_general between two activations whose output,
  through elementwise ops (scaling, masking), reaches a ``reduce_max`` over its
  last axis followed by ``exp``: the softmax over keys. The site is the softmax's
  input, one row of scores per query.

Both are keyed like the interpreter keys eqns, so a pass can hook their outputs.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from typing import Any, Sequence

from jax.extend import core as jex_core

from sparsejax.compiler.interpreter import Key, Scope, sub_jaxprs
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
    """

    kind: str
    key: Key
    output: int
    shape: tuple[int, ...]
    scope: Scope
    paths: tuple[str, ...]

    @property
    def width(self) -> int:
        return self.shape[-1]

    @property
    def rows(self) -> int:
        return math.prod(self.shape[:-1]) * self.scope.trips

    def describe(self) -> str:
        return f"{self.kind} at {'/'.join(map(str, self.key))} ({'×'.join(map(str, self.shape))})"


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


class _Scope:
    """Def-use information for one jaxpr."""

    def __init__(self, jaxpr, prefix: Key, weight_sites: dict[Key, list[WeightSite]]):
        self.jaxpr, self.prefix = jaxpr, prefix
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
    out_size = math.prod(start.aval.shape)
    region: set[int] = set()
    inputs: list[int] = []                     # eqn indices of up/gate weight sites
    frontier, seen = deque([start]), {start}
    while frontier:
        v = frontier.popleft()
        if v not in scope.producer:
            return None                        # reaches a body input: not a closed FFN region
        i, _ = scope.producer[v]
        eqn = scope.eqn(i)
        if i in scope.sites:
            inputs.append(i)
            continue
        if _is_elementwise(eqn):
            region.add(i)
            for u in eqn.invars:
                if isinstance(u, jex_core.Var) and u not in seen:
                    seen.add(u)
                    frontier.append(u)
            continue
        if math.prod(v.aval.shape) < out_size and eqn.primitive.name in _SHAPE_ONLY:
            continue                           # a broadcast bias or scale: a constant here
        return None
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
    return ActivationSite("ffn", scope.prefix + (p_eqn,), p_out, tuple(pre_var.aval.shape), sc,
                          (*ups, scope.sites[down][0].path))


def _pre_activation(scope: _Scope, u, region: set[int]):
    """The first value on ``u``'s linear path that a nonlinearity reads, or None."""
    frontier, seen = deque([u]), {u}
    while frontier:
        v = frontier.popleft()
        for i in sorted(scope.consumers.get(v, [])):
            if i not in region:
                continue
            eqn = scope.eqn(i)
            if _is_nonlinear(eqn):
                return v
            if eqn.primitive.name in _LINEAR:
                for w in eqn.outvars:
                    if w not in seen and w.aval.shape == u.aval.shape:
                        seen.add(w)
                        frontier.append(w)
    return None


def _attention_site(scope: _Scope, i: int, sc: Scope) -> ActivationSite | None:
    eqn = scope.eqn(i)
    out = eqn.outvars[0]
    if len(out.aval.shape) < 2:
        return None
    last = len(out.aval.shape) - 1
    frontier, seen = deque([out]), {out}
    softmax_input = None
    while frontier and softmax_input is None:
        v = frontier.popleft()
        for j in sorted(scope.consumers.get(v, [])):
            e = scope.eqn(j)
            if e.primitive.name == "reduce_max" and tuple(e.params["axes"]) == (last,):
                if _reaches_exp(scope, v):
                    softmax_input = v
                    break
            elif _is_elementwise(e):
                for w in e.outvars:
                    if w not in seen and w.aval.shape == out.aval.shape:
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
        if e.primitive.name in _SHAPE_ONLY or _is_elementwise(e):
            for u in e.invars:
                if isinstance(u, jex_core.Var) and u not in seen:
                    seen.add(u)
                    frontier.append(u)
    return tuple(paths)


def find_activation_sites(jaxpr, weight_sites: Sequence[WeightSite]) -> list[ActivationSite]:
    """Every FFN and attention site of ``jaxpr`` (an open Jaxpr), in program order."""
    by_key: dict[Key, list[WeightSite]] = {}
    for s in weight_sites:
        by_key.setdefault(s.key, []).append(s)
    found: list[ActivationSite] = []

    def walk(j, prefix: Key, sc: Scope):
        scope = _Scope(j, prefix, by_key)
        for i, eqn in enumerate(j.eqns):
            if i in scope.sites:
                site = _ffn_site(scope, i, sc)
                if site is not None:
                    found.append(site)
            elif eqn.primitive.name == "dot_general":
                site = _attention_site(scope, i, sc)
                if site is not None:
                    found.append(site)
            for name, sub in sub_jaxprs(eqn):
                inner = sc
                if eqn.primitive.name == "scan":
                    inner = sc.enter("scan", eqn.params["length"])
                elif name == "body_jaxpr":
                    inner = sc.enter("while", None)
                walk(sub, prefix + (i, name), inner)

    walk(jaxpr, (), Scope())
    unique = {(s.kind, s.key, s.output): s for s in found}
    return list(unique.values())
