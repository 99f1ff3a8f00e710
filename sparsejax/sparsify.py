"""``sparsify(fn, recipe)``: the transform.

``fn`` is any JAX function whose first argument is a pytree of parameters: a
Linen ``model.apply`` (params = the variables dict), an NNX function
``lambda state, x: nnx.merge(graphdef, state)(x)``, or a plain function.

    sfn = sparsify(model.apply, recipe)
    sparams, sstate = sfn.init(variables, x)     # traces fn once, finds sites, builds masks
    y = sfn(sparams, sstate, x)                  # the rewritten program
    print(sfn.report())

``sfn(...)`` evaluates a rewritten jaxpr cached per input signature (avals,
tree structure and non-array arguments), so under ``jax.jit`` it is traced
once, and it composes with ``jax.grad``, ``jax.vmap``, ``jax.checkpoint`` and
sharded jit like any JAX function. Arguments after the parameters that are not
arrays (Python bools, strings, numbers) are treated as static.

State: ``sstate = {"masks": masks}`` (plus ``"thresholds"``, ``{name: array}``, when the
recipe has activation-threshold rules: set them with ``sfn.calibrate``), where ``masks`` has the structure of
``sparams`` with a boolean array for every masked leaf and ``None`` elsewhere.
Masks have one owner at a time: ``sstate`` owns the fixed masks a recipe's rules
compute at init; an optimizer transform in ``sparsejax.optim`` that moves masks
(``prune``, SET, RigL, the N:M transforms) takes them at init and owns them from
then on. ``sparsejax.optim.forward_masks(sstate, opt_state)`` is the one hand-over:
``sfn(params, {"masks": optim.forward_masks(sstate, opt_state)}, x)``
(docs/architecture.md, "Who owns the masks").
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core

from sparsejax import paths as path_lib
from sparsejax.compiler import passes
from sparsejax.compiler import calibration
from sparsejax.compiler import plan as plan_lib
from sparsejax.compiler import report_builder
from sparsejax.compiler import thresholds as threshold_lib
from sparsejax.compiler.activation_sites import ActivationSite
from sparsejax.compiler.passes.factorized import STORED_DENSE, FactorizedHandler
from sparsejax.compiler.passes.rewrite import compose_input_hooks, rewritten_program
from sparsejax.compiler.passes.thresholds import threshold_hook
from sparsejax.compiler.plan import Slot as _Slot, Traced as _Traced
from sparsejax.kernels import program_tuning
from sparsejax.report import Report
from sparsejax.rules import ActivationRule, MaskRule, Recipe, Rule, recipe_of

__all__ = ["sparsify", "SparseFunction"]

_log = logging.getLogger(__name__)


def sparsify(fn: Callable, recipe: Recipe | Sequence[Rule] | Rule) -> "SparseFunction":
    """Returns ``fn`` rewritten by ``recipe``; call ``.init`` first, then the function.

    Args:
      fn: a function ``fn(params, *args, **kwargs)``.
      recipe: a :class:`~sparsejax.Recipe` (or a rule, or a list of rules).
    """
    return SparseFunction(fn, recipe_of(recipe))


_aval_key = plan_lib.aval_key
_is_array = plan_lib.is_array


class SparseFunction:
    """A function rewritten by a recipe. Build it with :func:`sparsify`."""

    def __init__(self, fn: Callable, recipe: Recipe):
        self.fn = fn
        self.recipe = recipe
        self.trace_count = 0        # traces of ``fn`` itself
        self.rewrite_count = 0      # rewritten jaxprs built
        self._traces: dict[Any, _Traced] = {}
        self._rewrites: dict[Any, tuple[Any, Any]] = {}
        self._slots: list[_Slot] | None = None
        self._dense_treedef = None
        self._sparams_treedef = None
        self._sparams_avals = None
        self._handlers: dict[str, passes.WeightHandler] = {}
        self._report: Report | None = None
        self._measured: list[dict] = []
        # set by lower(): per masked leaf, (path, the mask object, its fingerprint)
        self._lowered_masks: list[tuple[str, Any, tuple[int, int]]] | None = None
        self._lowered_slot_masks = None   # lower(): the masks lowered (the report reads its paths)
        self._packed_paths: frozenset = frozenset()   # lower(packed=True): leaves held as blocks
        self._premasked_paths: frozenset = frozenset()   # lower(premasked=True): zero outside masks
        self._stored_dense_paths: frozenset = frozenset()  # lower(premasked=True): factors + dense
        self._unstored_params = None      # lower(premasked=True): init's (treedef, avals), for premask
        self._sibling_tables: dict | None = None   # lower(fuse_siblings=True): member paths -> tables
        self._dense_gemv = False          # lower(dense_gemv=True): unruled weights choose a GEMV path
        self._thresholds: list = []       # (ThresholdPoint, rule) of the threshold rules
        self._threshold_info: dict = {}   # name -> {"target", "measured"} from calibrate()

    # ------------------------------------------------------------------ tracing

    def _split_args(self, args, kwargs):
        leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
        dynamic = tuple(i for i, x in enumerate(leaves) if _is_array(x))
        static = tuple((i, x) for i, x in enumerate(leaves) if not _is_array(x))
        try:
            hash(static)
        except TypeError as e:
            raise TypeError(f"non-array arguments must be hashable (they are static): {e}") from None
        return leaves, treedef, dynamic, static

    def _trace(self, dense_avals: Sequence[Any], leaves, arg_treedef, dynamic, static) -> _Traced:
        key = (tuple(_aval_key(a) for a in dense_avals), arg_treedef, static,
               tuple(_aval_key(leaves[i]) for i in dynamic))
        traced = self._traces.get(key)
        if traced is not None:
            return traced
        self.trace_count += 1
        paths = [s.path for s in self._slots] if self._slots else self._init_paths
        traced = plan_lib.trace_program(self.fn, self._dense_treedef, dense_avals, paths, leaves,
                                        arg_treedef, dynamic, static)
        self._traces[key] = traced
        return traced

    # --------------------------------------------------------------------- init

    def init(self, params: Any, *args: Any, rng: jax.Array | None = None,
             **kwargs: Any) -> tuple[Any, dict]:
        """Traces ``fn(params, *args, **kwargs)``, finds its sites, builds the sparse state.

        Args:
          params: the dense parameters (the first argument of ``fn``).
          *args, **kwargs: example arguments (only shapes and static values matter).
          rng: a PRNG key for rules that draw random masks or factors.

        Returns:
          ``(sparams, sstate)``: the parameters the rewritten function takes (the
          dense ones, or factors where a rule factorizes a leaf) and the sparsity
          state ``{"masks": ...}``.
        """
        with_path, self._dense_treedef = jax.tree_util.tree_flatten_with_path(params)
        # A second init rebuilds what depends on it; its trace is the one later methods read.
        self._rewrites, self._handlers, self._traces = {}, {}, {}
        leaves = [x for _, x in with_path]
        self._init_paths = [path_lib.path_str(kp) for kp, _ in with_path]
        if len(set(self._init_paths)) != len(self._init_paths):
            raise ValueError("parameter paths are not unique; give the pytree distinct keys")
        for path, leaf in zip(self._init_paths, leaves):
            if not _is_array(leaf):
                raise TypeError(f"{path}: parameters must be arrays, got {type(leaf).__name__}")
        arg_leaves, arg_treedef, dynamic, static = self._split_args(args, kwargs)
        traced = self._trace(leaves, arg_leaves, arg_treedef, dynamic, static)
        self._init_call = (arg_treedef, dynamic, static, bool(kwargs))
        self._init_args_treedef = jax.tree_util.tree_structure(args)
        self._slots = self._assign_rules(leaves, traced)
        passes.check_plan(self._activation_plan(traced, check="init"))
        self._thresholds = threshold_lib.threshold_plan(self.recipe, traced)
        self._threshold_info = {}
        _require_rng(rng, [s.rule for s in self._slots], "init")
        rng = jax.random.key(0) if rng is None else rng

        items, masks = [], []
        for slot, leaf in zip(self._slots, leaves):
            item, mask = leaf, None
            if slot.rule is not None:
                handler = passes.weight_handler(slot.rule, slot.path, slot.layout, slot.sites)
                if hasattr(handler, "bind_program"):   # passes that need the whole program
                    handler.bind_program(traced, self._slots)
                self._handlers[slot.path] = handler
                item, mask = handler.init(jnp.asarray(leaf), jax.random.fold_in(rng, slot.index))
            items.append(item)
            masks.append(mask if mask is not None else jax.tree.map(lambda _: None, item))
        sparams = jax.tree_util.tree_unflatten(self._dense_treedef, items)
        self._sparams_treedef = jax.tree_util.tree_structure(sparams)
        self._sparams_avals = [(tuple(jnp.shape(x)), jnp.result_type(x))
                               for x in jax.tree_util.tree_leaves(sparams)]
        sstate = {"masks": jax.tree_util.tree_unflatten(self._dense_treedef, masks)}
        if self._thresholds:      # 0 until calibrated: only exact zeros are dropped
            sstate["thresholds"] = {p.name: jnp.zeros(p.state_shape(), jnp.float32)
                                    for p, _ in self._thresholds}
        self._report = self._build_report(traced, self._slot_masks(sstate))
        self._warn_untouched()
        return sparams, sstate

    def _warn_untouched(self) -> None:
        """One line naming the matmul weights no weight rule touched (when some rule does)."""
        if not any(s.rule is not None for s in self._slots):
            return
        dense = [s.path for s in self._slots if s.sites and s.rule is None]
        if dense:
            _log.warning("sparsify: %d matmul weight(s) no rule touched stay dense: %s%s; "
                         "MatmulWeights() selects weights by what they do", len(dense),
                         ", ".join(dense[:8]), ", ..." if len(dense) > 8 else "")

    def _assign_rules(self, leaves, traced: _Traced) -> list[_Slot]:
        return plan_lib.assign_rules(self.recipe, self._init_paths, leaves, traced)

    def _activation_plan(self, traced: _Traced, check: str | None = None
                         ) -> list[tuple[ActivationSite, ActivationRule | None]]:
        """Each activation site with the first activation rule that selects it (or None).

        ``check="init"``: every activation rule must select a site; ``check="call"``:
        a rule that selected sites at init must select some in this trace too (a
        rule that silently selects nothing would leave the model dense).
        """
        plan, used = plan_lib.activation_plan(self.recipe, traced)
        if check == "init":
            self._activation_counts = dict(used)
        if check is not None:
            plan_lib.check_activation_plan(self.recipe, traced, used,
                                           None if check == "init" else self._activation_counts)
        return plan

    # --------------------------------------------------------------------- call

    def _check_params(self, sparams, want_treedef=None, want_avals=None) -> list:
        if self._slots is None:
            raise RuntimeError("call .init(params, *args) before calling the sparsified function")
        want_treedef = want_treedef or self._sparams_treedef
        want_avals = want_avals or self._sparams_avals
        sparams = _conform(sparams, want_treedef)
        leaves, treedef = jax.tree_util.tree_flatten(sparams)
        if treedef != want_treedef:
            got = set(path_lib.leaf_paths(sparams))
            want = set(path_lib.leaf_paths(jax.tree_util.tree_unflatten(
                want_treedef, [0] * want_treedef.num_leaves)))
            missing, extra = sorted(want - got), sorted(got - want)
            hint = ""
            if self._stored_dense_paths and want_treedef is self._sparams_treedef:
                hint = ("; this copy was lowered with premasked=True: pass "
                        "lowered.premask(sparams, sstate), which stores each factorized leaf's "
                        "dense product")
            raise ValueError("params do not match the structure given to init: "
                             f"missing {missing[:5]}, unexpected {extra[:5]}{hint}")
        for path, x, (shape, _) in zip(path_lib.leaf_paths(sparams), leaves, want_avals):
            if tuple(jnp.shape(x)) != shape:
                raise ValueError(f"{path}: shape {tuple(jnp.shape(x))} differs from the shape "
                                 f"{shape} given to init")
        return leaves

    def _mask_leaves(self, sstate) -> list:
        """Masks flattened like the sparse params' leaves (None where unmasked)."""
        if not isinstance(sstate, dict) or "masks" not in sstate:
            raise TypeError("sstate must be the dict returned by init: {'masks': ...}")
        try:
            return self._sparams_treedef.flatten_up_to(self._masks_tree(sstate))
        except (ValueError, TypeError) as e:
            raise ValueError(f"sstate['masks'] does not match the params structure: {e}") from None

    def _masks_tree(self, sstate) -> Any:
        """``sstate['masks']`` in the params' structure: init's, plus (a copy lowered with
        ``premasked=True``) an unmasked entry for each stored dense product."""
        if self._unstored_params is None:
            return _conform(sstate["masks"], self._sparams_treedef)
        masks = self._dense_treedef.flatten_up_to(_conform(sstate["masks"], self._unstored_params[0]))
        return self._dense_treedef.unflatten([
            {**m, STORED_DENSE: None} if s.path in self._stored_dense_paths and isinstance(m, dict)
            else m for s, m in zip(self._slots, masks)])

    def _slot_items(self, sparams) -> list:
        """The sparse params grouped per dense leaf: an array, or a subtree (factors)."""
        return self._dense_treedef.flatten_up_to(_conform(sparams, self._sparams_treedef))

    def _slot_masks(self, sstate) -> list:
        """One mask (or None) per dense leaf."""
        self._mask_leaves(sstate)
        masks = self._dense_treedef.flatten_up_to(self._masks_tree(sstate))
        return [m if _is_array(m) else None for m in masks]

    def __call__(self, sparams: Any, sstate: dict, *args: Any, **kwargs: Any) -> Any:
        return self._call(sparams, sstate, args, kwargs, aux=None)

    def with_aux(self, l1: str = "ffn") -> Callable:
        """The function returning ``(output, aux)``: auxiliary outputs a training loop adds
        to its loss.

        ``l1="ffn"``: the activation of every FFN (``act(gate)`` where it meets the up
        branch, after any rewrite such as :class:`~sparsejax.rules.ReLUActivation`):
        ``aux["activation_l1"]``, the mean ``|act|`` over sites, layers and entries
        (ProSparse's L1 regulariser; multiply by a factor such as
        :func:`sparsejax.optim.prosparse_l1_schedule`), and ``aux["activation_sparsity"]``,
        the mean fraction of exact zeros.
        """
        if l1 != "ffn":
            raise ValueError(f"with_aux: l1 must be 'ffn' (the FFN activations), got {l1!r}")

        def fn(sparams, sstate, *args, **kwargs):
            return self._call(sparams, sstate, args, kwargs, aux=l1)
        return fn

    def _threshold_leaves(self, sstate) -> list:
        if not self._thresholds:
            return []
        given = sstate.get("thresholds") if isinstance(sstate, dict) else None
        if not isinstance(given, dict):
            raise ValueError("sstate['thresholds'] is missing: the recipe has activation-threshold "
                             "rules; pass the sstate init (or calibrate) returned")
        out = []
        for p, r in self._thresholds:
            t = given.get(p.name)
            if t is None or tuple(jnp.shape(t)) != p.state_shape():
                raise ValueError(f"{r.describe()}: sstate['thresholds'][{p.name!r}] must be an "
                                 f"array of shape {p.state_shape()}, got "
                                 f"{None if t is None else tuple(jnp.shape(t))}; pass the sstate "
                                 "init or calibrate returned")
            out.append(t)
        return out

    def _call(self, sparams, sstate, args, kwargs, aux):
        param_leaves = self._check_params(sparams)
        mask_leaves = self._mask_leaves(sstate)
        for slot, m in zip(self._slots, self._slot_masks(sstate)):
            needs = isinstance(slot.rule, MaskRule) and slot.path not in self._packed_paths
            if needs and (m is None or tuple(jnp.shape(m)) != slot.shape):
                raise ValueError(f"{slot.path}: sstate['masks'] needs a mask of shape {slot.shape}")
        if self._lowered_masks is not None:
            self._check_lowered_masks(self._slot_masks(sstate))
        if self._premasked_paths:
            self._check_premasked(self._slot_items(sparams), self._slot_masks(sstate))
        present = [m for m in mask_leaves if m is not None]
        arg_leaves, arg_treedef, dynamic, static = self._split_args(args, kwargs)
        dyn = [arg_leaves[i] for i in dynamic]
        flat = [*param_leaves, *present, *dyn, *self._threshold_leaves(sstate)]
        # Sites choose their path for a forward pass or a training step (see passes.base).
        autodiff = passes.base.under_autodiff(flat)
        key = (arg_treedef, static, tuple(i for i, m in enumerate(mask_leaves) if m is not None),
               tuple(_aval_key(x) for x in flat), autodiff, aux)
        entry = self._rewrites.get(key)
        if entry is None:
            with passes.base.rewriting_for_autodiff(autodiff):
                entry = self._rewrite(param_leaves, mask_leaves, arg_leaves, arg_treedef, dynamic,
                                      static, flat, aux)
            self._rewrites[key] = entry
        closed, out_tree = entry
        out = jex_core.jaxpr_as_fun(closed)(*flat)
        return jax.tree_util.tree_unflatten(out_tree, out)

    def _rewrite(self, param_leaves, mask_leaves, arg_leaves, arg_treedef, dynamic, static, flat,
                 aux=None):
        traced = self._trace_for(param_leaves, arg_leaves, arg_treedef, dynamic, static)
        passes.rebind_handlers(self, self._handlers, traced)
        plan = self._activation_plan(traced, check="call")
        hooks = passes.activation_hooks(plan)
        inputs = dict(hooks.inputs)
        state_keys = []
        for point, _ in self._thresholds_for(traced):
            t = threshold_hook(point.operand)
            inputs[point.key] = compose_input_hooks(inputs[point.key], t) if point.key in inputs else t
            state_keys.append(point.key)
        aux_points = ()
        if aux is not None:
            aux_points = [(s.act_key, s.act_operand) for s, _ in plan
                          if s.kind == "ffn" and s.act_key is not None]
            if not aux_points:
                raise ValueError("with_aux(l1='ffn'): the program has no FFN activation site")
        outputs = {**passes.program_hooks(self._handlers.values(), traced), **hooks.outputs}
        fusion = None
        if self._sibling_tables is not None:
            from sparsejax.compiler.passes import sibling_fusion
            fusion = sibling_fusion.SiblingFusion(sibling_fusion.find_groups(
                self._handlers, traced, frozenset(inputs) | {k for k, _ in aux_points},
                self._sibling_tables))
        program = self._program(traced, outputs, len(param_leaves), mask_leaves, inputs,
                                state_keys, aux_points, fusion)
        self.rewrite_count += 1
        structs = [jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)) for x in flat]
        closed, shape = jax.make_jaxpr(program, return_shape=True)(*structs)
        if aux is None:
            return closed, traced.out_tree
        out_shape = (jax.tree_util.tree_unflatten(traced.out_tree, list(shape[0])), shape[1])
        return closed, jax.tree_util.tree_structure(out_shape)

    def _thresholds_for(self, traced: _Traced) -> list:
        """The threshold points of ``traced``.

        A call traced differently from init (params of another dtype, another batch) has its
        eqns elsewhere; its points are planned on its own trace and matched to init's by name
        (the weight path they feed) and threshold shape, so ``sstate["thresholds"]`` serves it.
        """
        if not self._thresholds:
            return []
        if traced is next(iter(self._traces.values())):
            return self._thresholds
        again = threshold_lib.threshold_plan(self.recipe, traced)
        if [(p.name, p.state_shape()) for p, _ in again] != \
                [(p.name, p.state_shape()) for p, _ in self._thresholds]:
            raise ValueError(f"{self._thresholds[0][1].describe()}: the program traced for these "
                             "arguments has other threshold sites than at init; call init with "
                             "arguments of this structure")
        return again

    def _trace_for(self, param_leaves, arg_leaves, arg_treedef, dynamic, static) -> _Traced:
        items = self._slot_items(jax.tree_util.tree_unflatten(self._sparams_treedef, param_leaves))
        dense_avals = [jax.ShapeDtypeStruct(s.shape, jnp.result_type(x) if _is_array(x) else s.dtype)
                       for s, x in zip(self._slots, items)]
        traced = self._trace(dense_avals, arg_leaves, arg_treedef, dynamic, static)
        self._check_sites(traced)
        return traced

    def _program(self, traced: _Traced, hooks, n_params: int, mask_leaves, input_hooks=None,
                 state_keys=(), aux_points=(), fusion=None) -> Callable:
        """The rewritten function of flat inputs (params leaves, present masks, array args,
        thresholds)."""
        return rewritten_program(traced, hooks, [self._handlers.get(s.path) for s in self._slots],
                                 n_params, [m is not None for m in mask_leaves],
                                 self._sparams_treedef, self._dense_treedef, _mask_item,
                                 input_hooks, state_keys, aux_points, fusion)

    def calibrate(self, sparams: Any, sstate: dict, batches, *,
                  global_sparsity: float | None = None) -> dict:
        """``sstate`` with the thresholds of the recipe's threshold rules set from data.

        Each point's threshold is the magnitude below which its rule's ``sparsity`` of
        the calibration activations falls (per layer of a scanned stack; per channel for
        CHESS's FFN points), observed on the program with every rule baked into the
        weights but no threshold applied (as TEAL calibrates). ``global_sparsity``
        instead allocates sparsity across points and layers greedily under that
        FLOP-weighted mean (TEAL's allocation; see
        :func:`sparsejax.compiler.thresholds.greedy_allocation`). The report then shows
        each point's target and the sparsity it measured on the calibration batches.

        Args:
          sparams, sstate: as returned by :meth:`init`.
          batches: an iterable of calibration batches, each the argument tuple after
            params (or one array), shaped like init's example arguments.
        """
        self._require_init()
        if not self._thresholds:
            raise ValueError("calibrate: the recipe has no activation-threshold rule (TEAL, CATS, "
                             "CHESS); nothing to calibrate")
        rule = self._thresholds[0][1].describe()
        arg_treedef, dynamic, static, has_kwargs = self._init_call
        if static or has_kwargs:
            raise ValueError(f"{rule}: calibrate needs a function whose arguments after params "
                             "are all arrays passed positionally")
        batches = [calibration.as_args(b) for b in batches]
        if not batches:
            raise ValueError(f"{rule}: calibrate got no batches")
        traced = next(iter(self._traces.values()))
        in_avals = traced.closed.in_avals[len(self._slots):]
        cal = calibration.Calibration(
            self.fn, self._dense_treedef, [s.path for s in self._slots], self._init_args_treedef,
            [(tuple(a.shape), a.dtype) for a in in_avals], traced.closed, traced.sites)
        try:
            for i, b in enumerate(batches):
                cal.check_args(b, f"calibration batch {i}")
        except ValueError as e:
            raise ValueError(f"{rule}: {e}") from None
        dense = self.dense_params(sparams, sstate)
        thresholds, info = threshold_lib.calibrate(cal, dense, batches, self._thresholds,
                                                   global_sparsity)
        measured = threshold_lib.measure(cal, dense, batches, self._thresholds, thresholds)
        for name in info:
            info[name]["measured"] = measured[name]
        self._threshold_info = info
        return {**sstate, "thresholds": thresholds}

    def measure_activations(self, sparams: Any, sstate: dict, *args: Any, **kwargs: Any) -> list[dict]:
        """Activation densities per site and per layer, on one batch.

        For every FFN and attention site (whether or not a rule selects it):
        ``before``, the fraction of pre-activations above zero (the neurons a ReLU
        would fire: the "lazy neuron" statistic) or of unmasked attention scores;
        ``after``, the fraction the site's top-k rule keeps (equal to ``before``
        where no rule applies). A scanned layer stack gives one entry per layer.
        The latest measurement also appears in :meth:`report`.
        """
        param_leaves = self._check_params(sparams)
        mask_leaves = self._mask_leaves(sstate)
        arg_leaves, arg_treedef, dynamic, static = self._split_args(args, kwargs)
        traced = self._trace_for(param_leaves, arg_leaves, arg_treedef, dynamic, static)
        plan = self._activation_plan(traced, check="call")
        records: dict[int, list[tuple[float, float]]] = {}

        def record(index, before, after):
            records.setdefault(int(index), []).append((float(before), float(after)))

        hooks = passes.measuring_hooks(plan, record)
        outputs = {**passes.program_hooks(self._handlers.values(), traced), **hooks.outputs}
        program = self._program(traced, outputs, len(param_leaves), mask_leaves, dict(hooks.inputs))
        flat = [*param_leaves, *[m for m in mask_leaves if m is not None],
                *[arg_leaves[i] for i in dynamic]]
        jax.block_until_ready(jax.jit(program)(*flat))
        jax.effects_barrier()
        results = []
        for i, (site, rule) in enumerate(plan):
            for layer, (before, after) in enumerate(records.get(i, [])):
                results.append({"site": site.describe(), "kind": site.kind, "key": site.key,
                                "paths": site.paths, "layer": layer,
                                "rule": rule.describe() if rule else None,
                                "before": before, "after": after})
        self._measured = results
        return results

    def _check_sites(self, traced: _Traced) -> None:
        have = {s.path for s in traced.sites}
        for slot in self._slots:
            if slot.rule is not None and slot.path not in have:
                raise ValueError(f"{slot.path}: {slot.rule.describe()}: with these arguments no "
                                 "matmul or conv uses this parameter, but init found one")

    # ------------------------------------------------------------------ helpers

    @property
    def layouts(self) -> Any:
        """Per-leaf :class:`WeightLayout` (None where no rule applies), params-structured."""
        self._require_init()
        return jax.tree_util.tree_unflatten(
            self._sparams_treedef, [s.layout if s.rule is not None else None for s in self._slots])

    @property
    def masked_paths(self) -> tuple[str, ...]:
        """Paths of the leaves a mask rule applies to (those with masks in ``sstate``)."""
        self._require_init()
        return tuple(s.path for s in self._slots if isinstance(s.rule, MaskRule))

    def rule_of(self, path: str) -> Rule | None:
        self._require_init()
        return next((s.rule for s in self._slots if s.path == path), None)

    def recompute_masks(self, sparams: Any, sstate: dict, *, sparsity: Any = None,
                        scores: Any = None, rng: jax.Array | None = None) -> dict:
        """New masks from the current weights (jit-able).

        Args:
          sparams, sstate: as returned by :meth:`init` (or trained since).
          sparsity: None (each rule's own), a float for every masked leaf, or a dict
            path -> float. May be traced. N:M rules keep their n:m.
          scores: optional params-structured scores (e.g. ``|w * g|``); default ``|w|``.
          rng: key for random rules.
        """
        self._check_params(sparams)
        items, old = self._slot_items(sparams), self._slot_masks(sstate)
        score_items = (self._slot_items(scores) if scores is not None else [None] * len(items))
        _require_rng(rng, [s.rule for s in self._slots], "recompute_masks")
        rng = jax.random.key(0) if rng is None else rng
        new = []
        for slot, w, m, sc in zip(self._slots, items, old, score_items):
            if not isinstance(slot.rule, MaskRule):
                new.append(m if m is not None else jax.tree.map(lambda _: None, w))
                continue
            s = sparsity.get(slot.path) if isinstance(sparsity, dict) else sparsity
            new.append(slot.rule.mask_for(slot.path, w, slot.layout,
                                          jax.random.fold_in(rng, slot.index), sc, s))
        return {**sstate, "masks": jax.tree_util.tree_unflatten(self._dense_treedef, new)}

    def dense_params(self, sparams: Any, sstate: dict) -> Any:
        """Parameters in the original structure with every rule baked in.

        Masked leaves become ``w * mask``; factorized leaves their dense matrix
        (the sparse-to-dense step: ``fn(dense_params(...))`` computes what the
        sparsified function computes, and trains on densely from there).
        """
        self._check_params(sparams)
        out = []
        self._mask_leaves(sstate)
        masks = self._dense_treedef.flatten_up_to(self._masks_tree(sstate))
        for slot, w, m in zip(self._slots, self._slot_items(sparams), map(_mask_item, masks)):
            handler = self._handlers.get(slot.path)
            out.append(w if handler is None else handler.make_input(w, m).materialize())
        return jax.tree_util.tree_unflatten(self._dense_treedef, out)

    def lower(self, sstate: dict, *, backend: str | None = None,
              interpret: bool = False, packed: bool = False,
              premasked: bool = False, fuse_siblings: bool = False,
              dense_gemv: bool = False) -> "SparseFunction":
        """A copy whose masked matmuls and Spark FFN sites take their fastest correct path.

        Masks are read from ``sstate`` now (concretely) and fixed in the copy: call
        ``lower`` again after masks change. At each site whose mask keeps whole
        blocks (unrolled or scanned layers), the block-sparse kernel and XLA's
        masked dense product are candidates; N:M-masked sites weigh the compressed
        N:M GEMV against XLA, Spark FFN sites the sparse-input/output GEMVs, and matmuls whose
        input an activation threshold zeroes (TEAL, CATS, CHESS) the sparse-input GEMV. The
        first trace of a signature picks one (measured on an accelerator, see
        ``sparsejax.kernels.path_choice``). Other sites stay on XLA; ``report()`` of
        the copy says which path each site took, its measured time against dense, or
        why it stayed on XLA. The copy keeps a fingerprint of the masks and, when
        called with concrete masks that differ, raises a ValueError instead of
        computing with the old ones; under ``jax.jit`` the masks are traced and
        cannot be checked, so there re-``lower`` whenever they change.

        Args:
          sstate: the state whose masks to lower.
          backend: "gpu", "tpu" or "cpu" (default: JAX's default backend).
          interpret: run the kernels in Pallas interpret mode (tests on CPU).
          packed: the copy takes packed params (:meth:`pack`): each lowered leaf
            held as its kept blocks only, memory ∝ density. Masks of those
            leaves are then not needed in ``sstate``.
          premasked: the copy takes :meth:`premask`'s params, for inference: masked leaves
            zero outside their masks (no mask multiply in the program), and each
            factorized (Monarch, block-diagonal) leaf's dense product stored beside its
            factors, a path its sites weigh against the factored product (the dense
            program's own dot: a site is never slower than dense for want of it; memory:
            the dense matrix on top of the factors).
          fuse_siblings: lowered block-sparse sites that multiply the same activation by
            weights of the same K (attention's q/k/v, a gated FFN's gate/up) may run as one
            kernel over their weights concatenated along N, where that measures faster
            than each on its own path (``compiler/passes/sibling_fusion.py``).
          dense_gemv: every weight no rule claims, whose sites are direct 2-D products, also
            takes its measured-fastest product at small batch (XLA's, XLA's on the row padded
            to two, or a streaming GEMV kernel), as it does beside a lowered Spark FFN. XLA
            compiles a one-row product as a reduction that runs well below memory bandwidth;
            this is a dense model's decode step with that avoided, for inference (the kernels
            have no gradient) and as the fair dense baseline of an activation-sparse one.
        """
        from sparsejax.compiler.passes.lowering import BlockSparseHandler
        from sparsejax.compiler.passes.nm_lowering import NMCompressedHandler
        from sparsejax.compiler.passes.sparse_input import activation_sparse_handlers
        from sparsejax.rules import NM

        if not isinstance(interpret, bool):
            raise ValueError(f"lower: interpret must be a bool (Pallas interpret mode), got "
                             f"{interpret!r}; name a kernel backend with backend=")
        self._require_init()
        if packed and premasked:
            raise ValueError("lower: packed=True holds kept blocks only and premasked=True dense "
                             "pre-masked leaves; choose one")
        if not isinstance(fuse_siblings, bool):
            raise ValueError(f"lower: fuse_siblings must be a bool, got {fuse_siblings!r}")
        if not isinstance(dense_gemv, bool):
            raise ValueError(f"lower: dense_gemv must be a bool, got {dense_gemv!r}")
        lowered = copy.copy(self)
        lowered._rewrites, lowered._handlers = {}, dict(self._handlers)
        slot_masks = self._slot_masks(sstate)
        for slot, mask in zip(self._slots, slot_masks):
            if isinstance(slot.rule, MaskRule):
                if isinstance(slot.rule, NM):
                    lowered._handlers[slot.path] = NMCompressedHandler(
                        self._handlers[slot.path], mask, backend, interpret)
                else:
                    lowered._handlers[slot.path] = BlockSparseHandler(
                        self._handlers[slot.path], mask, backend, interpret, packed=packed,
                        premasked=premasked)
        lowered._dense_gemv = dense_gemv
        lowered._handlers.update(activation_sparse_handlers(self, backend=backend, interpret=interpret,
                                                            dense_gemv=dense_gemv))
        if premasked:   # factorized leaves hold their dense product too (premask computes it)
            stored = {s.path: self._handlers[s.path].with_stored_dense() for s in self._slots
                      if type(self._handlers.get(s.path)) is FactorizedHandler}
            lowered._handlers.update(stored)
            lowered._stored_dense_paths = frozenset(stored)
            if stored:
                avals = jax.tree_util.tree_unflatten(self._sparams_treedef, [
                    jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in self._sparams_avals])
                with_dense = jax.eval_shape(lowered._store_dense, avals)
                lowered._unstored_params = (self._sparams_treedef, self._sparams_avals)
                lowered._sparams_treedef = jax.tree_util.tree_structure(with_dense)
                lowered._sparams_avals = [(tuple(x.shape), x.dtype)
                                          for x in jax.tree_util.tree_leaves(with_dense)]
        if packed:
            lowered._packed_paths = frozenset(p for p, h in lowered._handlers.items()
                                              if getattr(h, "packed", False))
            leaves = [(jnp.zeros(lowered._handlers[s.path].packed_shape(), dtype)
                       if s.path in lowered._packed_paths else jnp.zeros(shape, dtype))
                      for s, (shape, dtype) in zip(self._slots, self._sparams_avals)] \
                if self._sparams_treedef.num_leaves == len(self._slots) else None
            if leaves is None:
                raise ValueError("lower(packed=True): factorized leaves cannot be packed with "
                                 "masked ones yet; lower without packed=True")
            lowered._sparams_avals = [(tuple(x.shape), x.dtype) for x in leaves]
        lowered._lowered_slot_masks = slot_masks
        lowered._premasked_paths = frozenset(
            p for p, h in lowered._handlers.items() if getattr(h, "premasked", False))
        lowered._lowered_masks = [(slot.path, mask, _mask_fingerprint(mask))
                                  for slot, mask in zip(self._slots, slot_masks)
                                  if isinstance(slot.rule, MaskRule)
                                  and slot.path not in lowered._packed_paths]
        lowered._sibling_tables = None
        if fuse_siblings:   # tables built now, for init's trace (other traces reuse them)
            from sparsejax.compiler.passes import sibling_fusion
            lowered._sibling_tables = {}
            traced = next(iter(self._traces.values()))
            sibling_fusion.mark_fusable(sibling_fusion.find_groups(
                lowered._handlers, traced, frozenset(), lowered._sibling_tables))
        lowered._report = lowered._build_report(next(iter(self._traces.values())), slot_masks)
        return lowered

    def _check_lowered_masks(self, slot_masks) -> None:
        """Raises when concrete masks differ from those ``lower`` fixed in this copy."""
        given = {s.path: m for s, m in zip(self._slots, slot_masks)}
        for path, mask, fingerprint in self._lowered_masks:
            m = given.get(path)
            if m is mask or isinstance(m, jax.core.Tracer):
                continue   # the same array, or traced (under jit: see lower's docstring)
            if m is None or _mask_fingerprint(m) != fingerprint:
                raise ValueError(f"{path}: sstate['masks'] differs from the masks this function "
                                 "was lowered with (lower() fixes them); call "
                                 "sfn.lower(sstate) again with the new masks")

    def _check_premasked(self, slot_items, slot_masks) -> None:
        """Raises when concrete params of a ``premasked`` copy keep weights outside the masks."""
        for slot, leaf, mask in zip(self._slots, slot_items, slot_masks):
            if slot.path not in self._premasked_paths or mask is None:
                continue
            if isinstance(leaf, jax.core.Tracer) or isinstance(mask, jax.core.Tracer):
                continue   # under jit: see lower's docstring
            if bool(jnp.any((leaf != 0) & ~jnp.asarray(mask, bool))):
                raise ValueError(f"{slot.path}: lower(premasked=True) needs weights that are zero "
                                 "outside the mask; pass lowered.premask(sparams, sstate)")

    def premask(self, sparams: Any, sstate: dict) -> Any:
        """Params for ``lower(premasked=True)``: every masked leaf multiplied by its mask, and
        every factorized leaf's dense product stored beside its factors (the factors
        multiplied out once, so a site can take the dense program's own dot where that is
        faster; memory: the dense matrix on top of the factors)."""
        treedef, avals = self._unstored_params or (self._sparams_treedef, self._sparams_avals)
        sparams = _conform(sparams, treedef)
        self._check_params(sparams, treedef, avals)
        items = [x * m.astype(x.dtype) if isinstance(s.rule, MaskRule) and m is not None else x
                 for s, x, m in zip(self._slots, self._dense_treedef.flatten_up_to(sparams),
                                    self._slot_masks(sstate))]
        return self._store_dense(self._dense_treedef.unflatten(items))

    def _store_dense(self, sparams: Any) -> Any:
        """``sparams`` (factors only) with each stored-dense leaf's dense product added."""
        if not self._stored_dense_paths:
            return sparams
        items = self._dense_treedef.flatten_up_to(sparams)
        return self._dense_treedef.unflatten([
            self._handlers[s.path].store_dense(x) if s.path in self._stored_dense_paths else x
            for s, x in zip(self._slots, items)])

    def pack(self, sparams: Any) -> Any:
        """Params for a copy made by ``lower(..., packed=True)``: lowered leaves as kept blocks.

        Each lowered leaf becomes its ``(*layers, capacity, bk, bn)`` kept blocks
        (memory ∝ density); other leaves are unchanged. The result is a pytree of
        arrays (orbax saves and restores it as it is); :meth:`dense_params`
        turns it back into dense parameters.
        """
        if not self._packed_paths:
            raise ValueError("pack: this function was not lowered with packed=True; call "
                             "sfn.lower(sstate, packed=True) first")
        leaves = jax.tree_util.tree_leaves(sparams)
        if len(leaves) != len(self._slots):
            raise ValueError("pack: params do not match the structure given to init")
        out = [self._handlers[s.path].pack_leaf(x) if s.path in self._packed_paths else x
               for s, x in zip(self._slots, leaves)]
        return jax.tree_util.tree_unflatten(self._sparams_treedef, out)

    def rewritten_jaxpr(self, sparams: Any, sstate: dict, *args: Any, **kwargs: Any):
        """The rewritten program as a ClosedJaxpr, for inspection."""
        return jax.make_jaxpr(lambda p, s: self(p, s, *args, **kwargs))(sparams, sstate)

    def invalidate(self) -> None:
        """Drops the rewritten programs cached per input signature: the next call traces and
        chooses every site's path again (after a path choice's cache or mode changed)."""
        self._rewrites.clear()

    def tune(self, step: Callable, *args, **kwargs):
        """Settles this function's close per-site path choices by timing ``step(*args)``, a
        plain function that calls it (a forward, a decode step, a training step), each way:
        :func:`sparsejax.kernels.program_tuning.tune` (keyword arguments go there). The
        verdicts are kept in the path choice's cache, so later traces take them; returns the
        :class:`~sparsejax.kernels.program_tuning.Tuning` (``.summary()`` says what changed;
        ``.compiler_options``, where not empty, are XLA options the step compiled faster
        with on a GPU: ``jax.jit(step, compiler_options=tuning.compiler_options)``).
        """
        return program_tuning.tune(step, *args, invalidate=self.invalidate, **kwargs)

    def report(self, sstate: dict | None = None) -> Report:
        """Every rewritten site and the parameters no rule touched.

        With ``sstate`` the densities are read from its masks; otherwise from init's.
        """
        self._require_init()
        traced = next(iter(self._traces.values()))
        if sstate is None and self._lowered_slot_masks is not None:
            return self._build_report(traced, self._lowered_slot_masks)
        if sstate is None:   # the paths sites have chosen since init
            rows = [dataclasses.replace(r, kernel=report_builder.compute_column(self._handlers[r.path]))
                    for r in self._report.rows]
            return dataclasses.replace(self._report, rows=rows,
                                       activations=self._activation_rows(traced))
        return self._build_report(traced, self._slot_masks(sstate))

    def _activation_rows(self, traced: _Traced):
        return report_builder.activation_rows(self._activation_plan(traced), self._measured,
                                              self._thresholds, self._threshold_info)

    def _build_report(self, traced: _Traced, slot_masks) -> Report:
        return report_builder.build_report(self._slots, self._handlers, slot_masks, traced.notes,
                                           self._activation_rows(traced))

    def _require_init(self):
        if self._slots is None:
            raise RuntimeError("call .init(params, *args) first")


@jax.jit
def _fingerprint_device(mask):
    bits = jnp.asarray(mask).astype(jnp.uint32).reshape(-1)
    # a pseudo-random weight per position (murmur3's finalizer): a linear weight would give
    # symmetric masks (one block pattern and its mirror) the same sum
    h = jnp.arange(bits.size, dtype=jnp.uint32)
    h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
    h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
    h = h ^ (h >> 16)
    return jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * h, dtype=jnp.uint32)


def _mask_fingerprint(mask) -> tuple[int, int] | None:
    """(kept count, position-weighted sum mod 2^32) of a concrete mask: two integers to compare
    on the host instead of the whole mask."""
    if mask is None:
        return None
    count, weighted = jax.device_get(_fingerprint_device(mask))
    return int(count), int(weighted)


def _require_rng(rng, rules, where: str) -> None:
    """Random masks from a silent default key would repeat across runs: ask for a key."""
    if rng is not None:
        return
    random = next((r for r in rules if getattr(r, "needs_rng", False)), None)
    if random is not None:
        raise ValueError(f"{random.describe()}: draws its masks at random; pass a PRNG key, "
                         f"e.g. sfn.{where}(..., rng=jax.random.key(0))")


def _conform(tree: Any, treedef: Any) -> Any:
    """``tree`` rebuilt with ``treedef`` when the two differ only in container types.

    A Flax ``FrozenDict`` and a plain dict with the same keys are the same parameters to a
    user (``model.apply`` takes either), but different pytrees to JAX: params initialised
    as one and passed as the other are accepted. Anything else is returned unchanged, for
    the caller's own structure check to report.
    """
    if jax.tree_util.tree_structure(tree) == treedef:
        return tree
    is_none = lambda x: x is None   # masks hold None where a leaf is not masked
    got = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_none)[0]
    want = jax.tree_util.tree_flatten_with_path(
        jax.tree_util.tree_unflatten(treedef, [0] * treedef.num_leaves), is_leaf=is_none)[0]
    if [path_lib.path_str(p) for p, _ in got] != [path_lib.path_str(p) for p, _ in want]:
        return tree
    if any((x is None) != (w is None) and w is None for (_, x), (_, w) in zip(got, want)):
        return tree
    return jax.tree_util.tree_unflatten(treedef, [x for (_, x), (_, w) in zip(got, want)
                                                  if w is not None])


def _mask_item(mask: Any) -> Any:
    """A slot's mask for its handler: an array, a subtree of factor masks holding an array
    (None for dense factors), or None."""
    if _is_array(mask) or jax.tree_util.tree_leaves(mask):
        return mask
    return None
