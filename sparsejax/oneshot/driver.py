"""``oneshot(fn, params, calib_batches, recipe, method=...)``: post-training pruning.

    result = sj.oneshot(model.apply, variables, batches, [sj.Prune("*/mlp/*", 0.5)],
                        method="sparsegpt")
    sfn = result.sfn                                  # sparsify(model.apply, recipe), init'ed
    logits = sfn(result.params, result.sstate, x)     # == model.apply(result.params, x)
    print(result.report)

The recipe's mask rules say where and how sparse (``Prune``: unstructured,
``NM``: n:m); the method says how weights are chosen (and, for SparseGPT,
updated). Calibration (:mod:`sparsejax.compiler.calibration`) is sequential
by default: the weight sites are pruned in program order, group by group
(sites that read the same activation, such as q/k/v, together; a scanned
stack layer by layer), and each group is calibrated on the activations the
already-pruned model produces. That costs one pass over the calibration
batches per group (per layer); ``sequential=False`` calibrates once on the
dense model.
"""

from __future__ import annotations

import dataclasses
import sys
import time
import warnings
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import rules as rules_lib
from sparsejax.compiler import calibration
from sparsejax.compiler.interpreter import Key
from sparsejax.compiler.passes.base import direct_site_reason
from sparsejax.compiler.sites import WeightSite
from sparsejax.oneshot import dsnot, magnitude, sparsegpt, wanda
from sparsejax.oneshot.structure import Structure, output_energy, reconstruction_error
from sparsejax.sparsify import SparseFunction, sparsify

METHODS = ("magnitude", "wanda", "sparsegpt", "dsnot")


@dataclasses.dataclass(frozen=True)
class SiteResult:
    """One pruned matrix: a leaf, or one layer of a stacked leaf."""

    path: str
    layer: tuple[int, ...]
    method: str
    structure: str
    tokens: int
    damp: float | None
    error_before: float    # relative ‖X(W − Ŵ)‖² / ‖XW‖² of the method's first mask, no update
    error_after: float     # ... of the weights it returns
    sparsity: float
    seconds: float

    @property
    def name(self) -> str:
        return self.path + (f"[{','.join(map(str, self.layer))}]" if self.layer else "")


@dataclasses.dataclass
class OneshotReport:
    """Per site: reconstruction error before/after, sparsity, dampening; and notes."""

    method: str
    sites: list[SiteResult]
    notes: list[str]
    passes: int            # calibration passes over the batches

    def __str__(self) -> str:
        lines = [f"one-shot pruning, method {self.method}: {len(self.sites)} matrices, "
                 f"{self.passes} calibration passes",
                 f"{'site':<44} {'structure':<18} {'tokens':>7} {'err mask':>9} {'err final':>9} "
                 f"{'sparsity':>8} {'damp':>6} {'s':>5}"]
        for r in self.sites:
            damp = f"{r.damp:.3g}" if r.damp is not None else "-"
            lines.append(f"{r.name:<44} {r.structure:<18} {r.tokens:>7} {r.error_before:>9.4f} "
                         f"{r.error_after:>9.4f} {r.sparsity:>8.3f} {damp:>6} {r.seconds:>5.2f}")
        lines.append("err: ‖X(W − Ŵ)‖² / ‖XW‖² on the calibration inputs the site saw; 'mask' is the "
                     "method's first mask on the dense weights, 'final' the weights returned")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def errors(self) -> dict[str, float]:
        return {r.name: r.error_after for r in self.sites}


class OneshotResult(NamedTuple):
    params: Any            # pruned (and for SparseGPT updated) params, zero where pruned
    sstate: dict           # {"masks": ...} for result.sfn
    sfn: SparseFunction    # sparsify(fn, recipe), initialised
    report: OneshotReport


def _structure(rule, path: str, method: str, per_output: bool | None) -> Structure:
    if isinstance(rule, rules_lib.NM):
        return Structure.nm(rule.n, rule.m)
    if isinstance(rule, rules_lib.Prune):
        if rule.method != "magnitude":
            raise ValueError(f"{path}: oneshot(method={method!r}): {rule.describe()}: one-shot "
                             "methods choose the mask themselves; leave Prune's method at 'magnitude'")
        wanda_like = method in ("wanda", "dsnot") if per_output is None else per_output
        return Structure("per_output" if wanda_like else "matrix", rule.sparsity)
    raise ValueError(f"{path}: oneshot(method={method!r}): {rule.describe()} is not supported; "
                     "one-shot pruning takes Prune (unstructured) and NM (n:m) rules")


@dataclasses.dataclass
class _Target:
    path: str
    index: int                 # leaf index in the flat params
    site: WeightSite
    layout: Any
    structure: Structure
    group: int = 0


def _first_scan_prefix(cal: calibration.Calibration, key: Key) -> Key | None:
    for end in range(1, len(key) + 1, 2):
        if calibration.eqn_at(cal.closed.jaxpr, key[:end]).primitive.name == "scan":
            return key[:end]
    return None


def _schedule(cal, targets: list[_Target], per_layer: bool = False,
              ) -> list[tuple[list[_Target], tuple[int, ...]]]:
    """(group of targets, layer) in program order; a scan's groups run layer by layer.

    ``per_layer``: the groups of one scanned layer form one step (one calibration pass).
    """
    groups: dict[Any, list[_Target]] = {}
    for t in sorted(targets, key=lambda t: cal.sites.index(t.site)):
        groups.setdefault(id(cal.site_input(t.site)), []).append(t)
    order, runs = list(groups.values()), []
    for g in order:
        scan = _first_scan_prefix(cal, g[0].site.key)
        if runs and scan is not None and runs[-1][0] == scan:
            runs[-1][1].append(g)
        else:
            runs.append((scan, [g]))
    schedule = []
    for scan, gs in runs:
        stack = gs[0][0].layout.stack_shape
        if scan is None or not stack:
            schedule += [(g, ()) for g in gs]
            continue
        for layer in np.ndindex(*stack):   # layer-major: layer l sees pruned layers < l
            layer = tuple(int(i) for i in layer)
            if per_layer:
                schedule.append(([t for g in gs for t in g], layer))
            else:
                schedule += [(g, layer) for g in gs]
    return schedule


def _check_target(t: _Target, method: str, n_sites: int) -> None:
    where = f"{t.path}: oneshot(method={method!r})"
    if n_sites != 1:
        raise ValueError(f"{where}: the leaf is used by {n_sites} matmuls (a tied weight?); "
                         "one-shot pruning needs one site per leaf: exclude it from the recipe")
    reason = direct_site_reason(t.site, t.layout)
    if reason is not None:
        raise ValueError(f"{where}: cannot calibrate this site ({reason}); one-shot pruning takes "
                         "dot_general sites (Dense, DenseGeneral, einsum, scanned stacks)")
    loops = [n for kind, n in t.site.scope.loops]
    if tuple(loops) != t.layout.stack_shape or t.layout.stack_axes != tuple(range(len(loops))):
        raise ValueError(f"{where}: the site runs in loops {t.site.scope.describe()} but the leaf "
                         f"stacks {t.layout.stack_shape} layers; one-shot pruning needs one scan "
                         "iteration per stacked layer (as nn.scan lays them out)")


def oneshot(fn: Callable, params: Any, calib_batches: Sequence[Any], recipe, *,
            method: str = "sparsegpt", per_output: bool | None = None,
            sequential: bool | str = True,
            damp: float = 0.01, block_size: int = 128, dsnot_base: str = "wanda",
            dsnot_cycles: int = 50, observe: str = "group",
            calibration_program: calibration.Calibration | None = None,
            progress: bool | Callable[[str], None] = False) -> OneshotResult:
    """Prunes ``params`` of ``fn(params, *batch)`` to ``recipe`` without training.

    Args:
      fn: ``fn(params, *args)``: a Linen ``apply``, an NNX merge-and-call, a plain function.
      params: the trained dense parameters.
      calib_batches: a sequence of calibration batches, each the argument tuple after
        ``params`` (a lone array means ``(array,)``); all the same shapes.
      recipe: mask rules (``Prune``, ``NM``) selecting the weights and their structure.
      method: "magnitude", "wanda", "sparsegpt" or "dsnot".
      per_output: unstructured sparsity met per output (True) or per matrix (False);
        None: per output for Wanda and DSnoT (Wanda's published choice), per matrix
        (SparseGPT's block-wise selection, magnitude) otherwise.
      sequential: True: calibrate each group of sites on the already-pruned model's
        activations (one pass per group, per layer of a scanned stack); "layer": the
        sites of one scanned layer are calibrated together, on the outputs of the pruned
        layers before it (one pass per layer, as the SparseGPT and Wanda code do; sites
        outside scans go group by group); False: one pass on the dense model.
      damp: SparseGPT's dampening, a fraction of the Hessian's mean diagonal.
      block_size: SparseGPT's lazy-update block (inputs per block).
      dsnot_base: the mask DSnoT starts from: "wanda" or "sparsegpt".
      dsnot_cycles: prune-and-grow swaps per output at most.
      observe: "group": each calibration pass observes only the group being pruned
        (memory: one group's K² at a time; one compiled program per group); "all":
        every pass observes every selected site (one compiled program, all K² at once).
      calibration_program: a :func:`sparsejax.compiler.calibration.trace` of ``fn`` to
        reuse (its compiled programs too) across calls with the same shapes.
      progress: print one line per pruned matrix (or call this function with it).

    Returns:
      ``OneshotResult(params, sstate, sfn, report)``.
    """
    if method not in METHODS:
        raise ValueError(f"oneshot: method must be one of {METHODS}, got {method!r}")
    if method == "dsnot" and dsnot_base not in ("wanda", "sparsegpt"):
        raise ValueError(f"oneshot(method='dsnot'): dsnot_base must be 'wanda' or 'sparsegpt', "
                         f"got {dsnot_base!r}")
    if not 0 <= damp < 1e3:
        raise ValueError(f"oneshot: damp must be >= 0 (a fraction of the mean diagonal), got {damp}")
    batches = [calibration.as_args(b) for b in calib_batches]
    if not batches:
        raise ValueError(f"oneshot(method={method!r}): calib_batches is empty")
    say = progress if callable(progress) else (lambda s: print(s, file=sys.stderr)) if progress \
        else (lambda s: None)

    if sequential not in (True, False, "layer"):
        raise ValueError(f"oneshot: sequential must be True, False or 'layer', got {sequential!r}")
    if observe not in ("group", "all"):
        raise ValueError(f"oneshot: observe must be 'group' or 'all', got {observe!r}")
    cal = calibration_program or calibration.trace(fn, params, *batches[0])
    for i, b in enumerate(batches):
        cal.check_args(b, f"oneshot(method={method!r}): calibration batch {i}")
    sfn = sparsify(fn, recipe)
    sparams, sstate = sfn.init(params, *batches[0])
    leaves = list(jax.tree_util.tree_leaves(params))
    masks = list(cal.treedef.flatten_up_to(sstate["masks"]))
    layouts = cal.treedef.flatten_up_to(sfn.layouts)
    targets = []
    for index, path in enumerate(cal.paths):
        rule = sfn.rule_of(path)
        if rule is None:
            continue
        sites = [s for s in cal.sites if s.path == path]
        t = _Target(path, index, sites[0] if sites else None, layouts[index],
                    _structure(rule, path, method, per_output))
        _check_target(t, method, len(sites))
        targets.append(t)

    schedule = _schedule(cal, targets, per_layer=sequential == "layer")
    results, notes, passes, stats_cache = [], [], 0, None
    all_keys = sorted(t.site.key for t in targets)
    if not sequential:
        stats_cache = cal.collect(_unflat(cal, leaves), batches, all_keys)
        passes = 1
    for step, (group, layer) in enumerate(schedule):
        if sequential:
            keys = all_keys if observe == "all" else [t.site.key for t in group]
            stats = cal.collect(_unflat(cal, leaves), batches, keys)
            passes += 1
        else:
            stats = stats_cache
        for t in group:
            start = time.perf_counter()
            site_stats = stats[t.site.key].layer(layer)
            matrix = t.layout.to_matrix(jnp.asarray(leaves[t.index]))
            w = matrix[layer]
            new_w, keep, info = _prune_matrix(method, w, site_stats, t, dsnot_base, damp,
                                              block_size, dsnot_cycles, notes, layer)
            matrix = matrix.at[layer].set(new_w.astype(matrix.dtype))
            leaves[t.index] = t.layout.from_matrix(matrix)
            mask_matrix = t.layout.to_matrix(jnp.asarray(masks[t.index])).at[layer].set(keep)
            masks[t.index] = t.layout.from_matrix(mask_matrix)
            energy = float(output_energy(w, site_stats.gram))
            rel = lambda x: float(x) / energy if energy > 0 else 0.0
            r = SiteResult(t.path, layer, method, t.structure.describe(),
                           int(site_stats.count), info.get("damp"),
                           rel(reconstruction_error(w, info["first"], site_stats.gram)),
                           rel(reconstruction_error(w, new_w, site_stats.gram)),
                           1.0 - float(jnp.mean(keep)), time.perf_counter() - start)
            results.append(r)
            say(f"[{len(results)}] {r.name}: {method} {r.structure}, error {r.error_after:.4f} "
                f"(mask only {r.error_before:.4f}), {r.seconds:.2f} s")
    pruned = _unflat(cal, leaves)
    sstate = {**sstate, "masks": jax.tree_util.tree_unflatten(cal.treedef, masks)}
    return OneshotResult(pruned, sstate, sfn, OneshotReport(method, results, notes, passes))


def _unflat(cal, leaves):
    return jax.tree_util.tree_unflatten(cal.treedef, leaves)


def _prune_matrix(method, w, stats, t: _Target, dsnot_base, damp, block_size, cycles, notes, layer):
    name = t.path + (f"[{','.join(map(str, layer))}]" if layer else "")
    k = w.shape[0]
    tokens = int(stats.count)
    if method == "magnitude":
        new_w, keep = magnitude.magnitude_prune(w, t.structure)
        return new_w, keep, {"first": new_w}
    if method == "wanda" or (method == "dsnot" and dsnot_base == "wanda"):
        new_w, keep = wanda.wanda_prune(w, stats.norm, t.structure)
        info = {"first": new_w}
    else:
        site_damp = damp
        if tokens < k:
            site_damp = max(damp * 10, 0.1)
            message = (f"{name}: {tokens} calibration tokens < {k} inputs: the Hessian is "
                       f"rank-deficient; dampening raised from {damp:g} to {site_damp:g} "
                       "(give more calibration batches)")
            notes.append(message)
            warnings.warn(f"oneshot(method={method!r}): {message}", stacklevel=3)
        try:
            new_w, keep, used = sparsegpt.sparsegpt_prune(w, stats.gram, t.structure,
                                                          damp=site_damp, block=block_size)
        except ValueError as e:
            raise ValueError(f"{name}: oneshot(method={method!r}): {e}") from None
        if used != site_damp:
            notes.append(f"{name}: the damped Hessian was not positive definite at {site_damp:g}; "
                         f"dampening raised to {used:g}")
        info = {"first": jnp.where(keep, w, 0), "damp": used}
    if method == "dsnot":
        first = new_w      # DSnoT's "before" is the mask (and weights) it starts from
        new_w, keep, swaps = dsnot.dsnot_refine(w, new_w, keep, stats.gram, stats.mean, stats.var,
                                                t.structure, cycles)
        info = {**info, "first": first}
    return new_w.astype(w.dtype), keep, info
