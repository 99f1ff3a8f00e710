"""The plan of a sparsified function: what each parameter leaf and activation site gets.

Built once by ``SparseFunction.init`` from the traced program, read by every call:

* :func:`trace_program` traces ``fn`` once per input signature and finds its weight
  sites, activation sites and weight roles (a :class:`Traced`);
* :func:`assign_rules` gives each parameter leaf its :class:`Slot`: the first weight
  rule that matches it, and the layout its sites read it in; a rule that claims
  nothing is an error naming why;
* :func:`activation_plan` pairs each activation site with the first activation rule
  that selects it.

No rewriting happens here: the passes (``compiler/passes``) compile a plan into a
program.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import paths as path_lib
from sparsejax.compiler.activation_sites import ActivationSite, find_activation_sites
from sparsejax.compiler.sites import WeightSite, WeightUses, find_weight_sites
from sparsejax.compiler.weight_roles import weight_roles
from sparsejax.layout import WeightLayout
from sparsejax.rules import ActivationRule, ActivationThreshold, Rule

__all__ = ["Slot", "Traced", "trace_program", "assign_rules", "activation_plan",
           "check_activation_plan", "leaf_layout", "aval_key", "is_array"]


@dataclasses.dataclass(frozen=True)
class Slot:
    """One leaf of the dense params and what the recipe does with it."""

    index: int
    path: str
    shape: tuple[int, ...]
    dtype: Any
    sites: tuple[WeightSite, ...]
    rule: Rule | None = None
    layout: WeightLayout | None = None


@dataclasses.dataclass
class Traced:
    """``fn`` traced for one input signature, with what the analyses found in it."""

    closed: Any               # ClosedJaxpr of fn(params leaves..., dynamic arg leaves...)
    out_tree: Any
    sites: list[WeightSite]
    notes: dict
    activation_sites: list[ActivationSite]
    uses: WeightUses = dataclasses.field(default_factory=WeightUses)
    roles: dict = dataclasses.field(default_factory=dict)   # path -> what the weight does


def aval_key(x) -> tuple:
    aval = jax.typeof(x) if hasattr(jax, "typeof") else jax.core.get_aval(x)
    return (tuple(aval.shape), str(aval.dtype), bool(getattr(aval, "weak_type", False)))


def is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic)) or isinstance(x, jax.core.Tracer)


def trace_program(fn: Callable, dense_treedef, dense_avals: Sequence[Any], paths: Sequence[str],
                  leaves, arg_treedef, dynamic, static) -> Traced:
    """Traces ``fn(params, *args, **kwargs)`` with abstract params and dynamic args.

    ``leaves`` are the flattened ``(args, kwargs)``; positions in ``dynamic`` become
    jaxpr inputs after the parameter leaves, the others (``static``) are baked in.
    """
    del static   # already in ``leaves``; part of the caller's cache key
    n_params = len(dense_avals)

    def flat_fn(*flat):
        params = jax.tree_util.tree_unflatten(dense_treedef, flat[:n_params])
        arg_leaves = list(leaves)
        for i, x in zip(dynamic, flat[n_params:]):
            arg_leaves[i] = x
        args, kwargs = jax.tree_util.tree_unflatten(arg_treedef, arg_leaves)
        return fn(params, *args, **kwargs)

    structs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in dense_avals]
    structs += [jax.ShapeDtypeStruct(jnp.shape(leaves[i]), jnp.result_type(leaves[i]))
                for i in dynamic]
    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*structs)
    out_tree = jax.tree_util.tree_structure(out_shape)
    sites, notes, uses = find_weight_sites(closed, paths, n_params)
    lookups = [p for p, ops in uses.reads.items() if "gather" in ops]
    return Traced(closed, out_tree, sites, notes,
                  find_activation_sites(closed.jaxpr, sites, n_params), uses,
                  weight_roles(closed.jaxpr, sites, lookups))


def leaf_layout(sites: Sequence[WeightSite]) -> WeightLayout | None:
    """The leaf's layout as its first site reads it.

    A weight read in two orientations (a tied embedding: a lookup and the output
    projection) gets the first site's; structured masks need a single one.
    """
    return next((s.layout for s in sites if s.layout is not None), None)


def assign_rules(recipe, init_paths: Sequence[str], leaves, traced: Traced) -> list[Slot]:
    """Each leaf's :class:`Slot`: the first weight rule matching it that has a site to rewrite."""
    by_path: dict[str, list[WeightSite]] = {}
    for site in traced.sites:
        by_path.setdefault(site.path, []).append(site)
    claimed: dict[int, list[str]] = {i: [] for i in range(len(recipe))}
    matched_any: dict[int, list[str]] = {i: [] for i in range(len(recipe))}
    slots = []
    for index, (path, leaf) in enumerate(zip(init_paths, leaves)):
        leaf_sites = tuple(by_path.get(path, ()))
        rule = layout = None
        for r_index, r in enumerate(recipe):
            if isinstance(r, ActivationRule) or not r.matches(path):
                continue
            if (isinstance(r.pattern, path_lib.MatmulWeights)
                    and not r.pattern.selects(path, traced.roles.get(path, frozenset()))):
                continue
            matched_any[r_index].append(path)
            if leaf_sites and rule is None:
                rule = r
                claimed[r_index].append(path)
        if rule is not None:
            layout = leaf_layout(leaf_sites)
        slots.append(Slot(index, path, tuple(jnp.shape(leaf)), jnp.result_type(leaf),
                          leaf_sites, rule, layout))
    site_paths = sorted(by_path)
    for r_index, r in enumerate(recipe):
        if claimed[r_index] or isinstance(r, ActivationRule):
            continue
        if not matched_any[r_index] and isinstance(r.pattern, path_lib.MatmulWeights):
            raise ValueError(f"{r.describe()}: selects no weight; matmul weights and their "
                             f"roles: {[(p, sorted(traced.roles[p])) for p in site_paths[:8]]}")
        if not matched_any[r_index]:
            near = path_lib.close_matches(r.pattern, site_paths or list(init_paths))
            hint = f"; close matches: {near}" if near else f"; weight parameters: {site_paths[:8]}"
            raise ValueError(f"{r.describe()}: the pattern matches no parameter{hint}")
        not_sites = [p for p in matched_any[r_index] if p not in by_path]
        between = {p: traced.uses.through[p] for p in not_sites if p in traced.uses.through}
        if between:
            path, ops = next(iter(between.items()))
            raise ValueError(
                f"{r.describe()}: {path} reaches a matmul only through "
                f"{', '.join(f'`{op}`' for op in ops)}, so no matmul multiplies by the "
                "weight itself; only views (casts, reshapes, transposes, slices) and "
                "scaling by a scalar may stand between a weight and its matmul: compute "
                "the product as a parameter of its own, or match the weights it is made of")
        if not_sites and len(not_sites) == len(matched_any[r_index]):
            raise ValueError(f"{r.describe()}: matches {not_sites[:5]}, but no matmul or "
                             "conv multiplies by them, so there is no weight site to rewrite")
        raise ValueError(f"{r.describe()}: every parameter it matches "
                         f"({matched_any[r_index][:5]}) is claimed by an earlier rule")
    return slots


def _selects(rule: ActivationRule, site: ActivationSite) -> bool:
    return rule.site == site.kind and (any(rule.matches(p) for p in site.paths) or rule.pattern == "*")


def activation_plan(recipe, traced: Traced
                    ) -> tuple[list[tuple[ActivationSite, ActivationRule | None]], dict[int, int]]:
    """Each activation site with the first activation rule that selects it (or None), and
    how many sites each rule (by ``id``) selected."""
    rules = [r for r in recipe if isinstance(r, ActivationRule)
             and not isinstance(r, ActivationThreshold)]    # thresholds: compiler/thresholds.py
    used = {id(r): 0 for r in rules}
    plan = []
    for site in traced.activation_sites:
        chosen = None
        for r in rules:
            if _selects(r, site):
                chosen = r
                used[id(r)] += 1
                break
        plan.append((site, chosen))
    return plan, used


def check_activation_plan(recipe, traced: Traced, used: dict[int, int],
                          init_counts: dict[int, int] | None) -> None:
    """Every activation rule selects a site: at init (``init_counts`` None), and in every
    later trace a rule that selected sites at init (a rule that silently selects nothing
    would leave the model dense)."""
    for r in (r for r in recipe if isinstance(r, ActivationRule)
              and not isinstance(r, ActivationThreshold)):
        if used[id(r)]:
            continue
        found = [s.describe() + f" {list(s.paths)}" for s in traced.activation_sites]
        what = r.site
        if init_counts is None:
            hint = getattr(r, "no_site_hint", "")
            raise ValueError(f"{r.describe()}: selects no {what} site; sites found: "
                             f"{found if found else 'none'}{'; ' + hint if hint else ''}")
        raise ValueError(f"{r.describe()}: selected {init_counts[id(r)]} {what} "
                         "site(s) at init, but none in the program traced for these "
                         f"arguments (sites found: {found if found else 'none'}); the "
                         "rewritten function would run dense there")
