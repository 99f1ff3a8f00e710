"""What a weight does, for rules that select weights by role instead of by name.

* ``"matmul"``: a dot_general (matmul, einsum) or a conv multiplies by it: it has
  a weight site;
* ``"embedding"``: it is also read by a lookup (a gather), as a token embedding
  table is (tied or not);
* ``"head"``: one of its matmuls produces a value that reaches the function's
  outputs with no other matmul in between: the output projection (or a tied
  embedding's decode).

Heads are found by a backward walk from the outputs over the jaxpr, through
loops and calls, stopping at weight sites.
"""

from __future__ import annotations

from typing import Sequence

from jax.extend import core as jex_core

from sparsejax.compiler.interpreter import Key, sub_jaxprs
from sparsejax.compiler.scan_params import scan_layout
from sparsejax.compiler.sites import WeightSite


def _var_flags(vars_, live: set) -> list[bool]:
    return [isinstance(v, jex_core.Var) and v in live for v in vars_]


def _live_inputs(jaxpr, out_live: Sequence[bool], prefix: Key, sites: dict[Key, list[str]],
                 heads: set[str]) -> list[bool]:
    """Which invars of ``jaxpr`` reach its live outputs without passing a weight site.

    Adds to ``heads`` the paths of the sites whose outputs are live.
    """
    live = {v for v, f in zip(jaxpr.outvars, out_live) if f and isinstance(v, jex_core.Var)}
    for i in reversed(range(len(jaxpr.eqns))):
        eqn = jaxpr.eqns[i]
        outs = _var_flags(eqn.outvars, live)
        if not any(outs):
            continue
        key = prefix + (i,)
        if key in sites:
            heads.update(sites[key])
            continue                        # a matmul ends the walk: its inputs feed a matmul
        ins = _eqn_live_inputs(eqn, outs, key, sites, heads)
        live.update(v for v, f in zip(eqn.invars, ins) if f and isinstance(v, jex_core.Var))
    return _var_flags(jaxpr.invars, live)


def _eqn_live_inputs(eqn, outs: list[bool], key: Key, sites, heads) -> list[bool]:
    subs = dict(sub_jaxprs(eqn))
    if not subs:
        return [True] * len(eqn.invars)
    name, p = eqn.primitive.name, eqn.params
    if name == "scan":
        nc, ncarry = scan_layout(eqn)[:2]
        carry = outs[:ncarry]
        while True:   # a carry is live after the loop, or because the next iteration reads it
            ins = _live_inputs(subs["jaxpr"], [*carry, *outs[ncarry:]], key + ("jaxpr",), sites,
                               heads)
            new = [a or b for a, b in zip(carry, ins[nc:nc + ncarry])]
            if new == carry:
                return ins
            carry = new
    if name == "while":
        nc, nb = p["cond_nconsts"], p["body_nconsts"]
        carry = list(outs)
        while True:
            ins = _live_inputs(subs["body_jaxpr"], carry, key + ("body_jaxpr",), sites, heads)
            new = [a or b for a, b in zip(carry, ins[nb:])]
            if new == carry:
                return [False] * nc + ins[:nb] + carry
            carry = new
    if name == "cond":
        ins = [False] * (len(eqn.invars) - 1)
        for sub_name, j in subs.items():
            branch = _live_inputs(j, outs, key + (sub_name,), sites, heads)
            ins = [a or b for a, b in zip(ins, branch)]
        return [False, *ins]
    (sub_name, j), = subs.items()
    if len(j.invars) != len(eqn.invars) or len(j.outvars) != len(outs):
        return [True] * len(eqn.invars)
    return _live_inputs(j, outs, key + (sub_name,), sites, heads)


def weight_roles(jaxpr, sites: Sequence[WeightSite],
                 lookups: Sequence[str] = ()) -> dict[str, frozenset[str]]:
    """Path -> roles (``"matmul"``, ``"embedding"``, ``"head"``) of every weight-site leaf.

    Args:
      jaxpr: the traced function's open jaxpr.
      sites: its weight sites.
      lookups: paths of the leaves some gather reads (embedding tables).
    """
    by_key: dict[Key, list[str]] = {}
    for s in sites:
        by_key.setdefault(s.key, []).append(s.path)
    heads: set[str] = set()
    _live_inputs(jaxpr, [True] * len(jaxpr.outvars), (), by_key, heads)
    roles: dict[str, frozenset[str]] = {}
    for path in {s.path for s in sites}:
        r = {"matmul"}
        if path in lookups:
            r.add("embedding")
        if path in heads:
            r.add("head")
        roles[path] = frozenset(r)
    return roles
