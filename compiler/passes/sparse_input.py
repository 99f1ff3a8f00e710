"""Activation-sparse lowering: FFN weights read only the rows their top-k activation needs.

After the Spark pass, an FFN's hidden activation ``h = act(topk(gate)) * up`` is
exactly zero outside each token's selected neurons. At decode that is bytes not
read:

* the **down** projection ``h @ W_d`` is a sparse-*input* GEMV: row ``j`` of
  ``W_d`` (``(d_ff, d_model)``, contiguous) is needed only if some token fired
  neuron ``j`` (:func:`sparsejax.kernels.sparse_input_gemv.sparse_input_gemv`,
  threshold 0, so the product is exact);
* the **up** projection is needed only at fired neurons: a sparse-*output*
  GEMV (:func:`sparsejax.kernels.sparse_output_gemv.sparse_output_gemv`). Its
  live mask is read from the Spark hook's top-k of the gate (the neurons some
  token keeps), so the gate is selected once. Dead
  up outputs are written as zeros, which the model multiplies by
  ``act(0) = 0`` (GELU, SiLU, ReLU): the same answer.

A site takes a kernel only where the bytes are contiguous: ``W_d`` stored with
its contracted axis first (Flax's ``(d_ff, d_model)``), ``W_u`` stored
output-major (PyTorch's ``(d_ff, d_model)``); the gate's top-k output must be
the gate dot itself (no bias in between). Everything else stays on XLA with
the reason in :meth:`ActivationSparseHandler.site_path`. Each eligible site
then takes its fastest correct path by measurement on the device
(:func:`~sparsejax.kernels.streaming_choice.choose_streaming`: inputs drawn
at the rule's density, weights streamed from memory), never a kernel that loses
to dense.

Entry point: :func:`activation_sparse_handlers` (for ``SparseFunction.lower``).
Only leaves no weight rule claims are handled here (a masked leaf keeps its
mask handler).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import topk
from sparsejax.compiler.activation_sites import down_projection_sites
from sparsejax.compiler.interpreter import bind_eqn
from sparsejax.compiler.param_ref import ParamRef, materialize
from sparsejax.compiler.passes.base import (WeightHandler, differentiated, direct_site_reason,
                                             matmul_at_site)
from sparsejax.kernels.streaming_choice import choose_streaming
from sparsejax.kernels import path_choice
from sparsejax.kernels import sparse_input_gemv as sig
from sparsejax.kernels import sparse_output_gemv as sog
from sparsejax.rules import SparkTopK

__all__ = ["ActivationSparseHandler", "activation_sparse_handlers", "ffn_roles"]


class _TakeOriginal(Exception):
    """Raised inside a site's lowering when XLA's dense product was chosen."""


class _Role:
    """What one weight site is in its FFN: ``gate``, ``up`` or ``down``."""

    def __init__(self, kind: str, ffn_key, rule, density: float, width: int):
        self.kind, self.ffn_key, self.rule, self.density, self.width = kind, ffn_key, rule, density, width


class ActivationSparseHandler(WeightHandler):
    """An unruled FFN weight whose sites read or write a top-k sparse activation, or any
    other unruled 2-D weight (a dense decode GEMV that takes its measured-fastest path)."""

    def __init__(self, path, layout, sites, roles: dict, backend, interpret, context: dict):
        super().__init__(None, path, layout, sites)
        self.roles, self.backend, self.interpret = roles, backend, interpret
        self.context = context           # gate site -> live mask, shared by one FFN's handlers
        self.choices: dict = {}
        self._reasons = {s.key: self.site_reason(s) for s in sites}
        self.sites_by_key = {s.key: s for s in sites}

    # -- eligibility -----------------------------------------------------------------

    def rebind(self, sites, roles=None) -> None:
        """:meth:`WeightHandler.rebind`, with this trace's FFN roles (see :func:`ffn_roles`)."""
        self.roles.update(roles or {})
        self.sites_by_key.update((s.key, s) for s in sites)
        super().rebind(sites)

    def site_reason(self, site) -> str | None:
        role = self.roles.get(site.key)
        if role is None:
            return "not an FFN site with a top-k rule"
        if role.kind in ("gate", "plain"):
            return None                   # computed dense (a gate also records the live mask)
        reason = direct_site_reason(site, site.layout)
        if reason is not None:
            return reason
        (lc, rc), _ = site.dimension_numbers
        w_contract = tuple(rc if site.operand == 1 else lc)
        nd = len(site.weight_shape)
        if role.kind == "down" and w_contract != tuple(range(len(w_contract))):
            if role.ffn_key is None:      # a thresholded input (TEAL, CATS, CHESS)
                return ("the weight's rows per input entry are not contiguous (store it with its "
                        "contracted axis first, (K, N))")
            return "W_down's rows are not contiguous (store it (d_ff, d_model))"
        if role.kind == "up" and w_contract != tuple(range(nd - len(w_contract), nd)):
            return "W_up's neuron rows are not contiguous (store it output-major, (d_ff, d_model))"
        return None

    def site_path(self, key) -> str:
        reason = self._reasons.get(key, "not a site found at init")
        if reason is not None:
            return f"XLA ({reason})"
        role = self.roles[key]
        choice = self.choices.get(key)
        if role.kind == "plain":
            return choice.summary() if choice is not None else "XLA dense (not measured)"
        if role.kind == "gate":
            dense = choice.summary() if choice is not None else "XLA"
            return f"{dense} (gate: dense; its top-k selects the up rows)"
        what = "sparse-input GEMV" if role.kind == "down" else "sparse-output GEMV"
        return choice.summary() if choice is not None else f"{what} where measured faster than XLA"

    # -- computing -------------------------------------------------------------------

    def init(self, leaf, key):
        return leaf, None

    def make_input(self, item, mask) -> ParamRef:
        return ParamRef.for_leaf(self.path, item, jnp.ndim(item), handler=self)

    def _kernel_unsupported(self, shape, dtype, rows) -> str | None:
        return sig.supported(shape, dtype, rows, backend=self.backend, interpret=self.interpret)

    def on_site(self, interp, eqn, key, invals, scope):
        operand = 0 if isinstance(invals[0], ParamRef) else 1
        ref, x = invals[operand], invals[1 - operand]
        reason = self._reasons.get(key, "not a site found at init")
        if reason is not None:
            return bind_eqn(eqn, [materialize(v) for v in invals])
        role = self.roles[key]
        original = lambda: bind_eqn(eqn, [materialize(v) for v in invals])
        if differentiated():
            # The GEMV kernels have no backward pass; a differentiated program (an inference
            # copy run under jax.grad, say, to probe it) computes each site as XLA's product.
            return original()
        if role.kind == "plain":
            return self._site_or_original(original, lambda: self._plain(key, eqn, operand, x, ref.value))
        if role.kind == "gate":
            out = self._site_or_original(original, lambda: self._gate(key, eqn, operand, x, ref.value))
            self.context[role.ffn_key] = self._live_mask(interp, eqn, key, role, out[0])
            return out
        w = ref.value       # contracted dims lead (down) or trail (up): reshapes copy nothing
        if role.kind == "down":
            return self._site_or_original(original, lambda: matmul_at_site(
                eqn, operand, x, lambda x2: self._down(key, role, x2, w.reshape(x2.shape[-1], -1))))
        live = self.context.pop(role.ffn_key, None)
        if live is None:                 # no gate mask in this trace: dense up
            return original()
        if callable(live):               # read from the Spark hook's output (_live_mask)
            live = live()
        return self._site_or_original(original, lambda: matmul_at_site(
            eqn, operand, x, lambda x2: self._up(key, role, x2, w.reshape(-1, x2.shape[-1]), live)))

    @staticmethod
    def _live_mask(interp, eqn, key, role, gate):
        """The neurons the up site must compute: those where some token's top-k gate is non-zero.

        Where the Spark hook rewrites this very equation's output (the gate dot), the mask is
        read from the hook's result once it is in the environment (a thunk the up site calls):
        one top-k per FFN, and the mask is exactly the entries that reach the activation (a
        kept entry whose soft value is 0 gives ``act(0) = 0``, as a dead one does). A second
        top-k here would cost a second pass over the gate (the hook's may be a Pallas kernel,
        which XLA cannot merge with). Elsewhere, the rule's top-k of the gate."""
        def any_row(kept):
            return jnp.any(kept.reshape(-1, kept.shape[-1]), axis=0)

        if key in interp.hooks and len(eqn.outvars) == 1:
            hooked = interp.deferred_value(eqn.outvars[0])
            return lambda: any_row(hooked() != 0)
        return any_row(topk.statistical_topk(gate, **role.rule.k_args(role.width), mode="mask"))

    @staticmethod
    def _site_or_original(original, lowered):
        """The lowered site, or the program's own equation where XLA's dense product was
        measured fastest: then the step is op for op the unlowered one (no transposes,
        casts or reshapes of ours around XLA's dot), never slower than it."""
        try:
            out = lowered()
        except _TakeOriginal:
            return original()
        return original() if out is None else out

    def _chosen(self, key, op, signature, cands, specs, check=True):
        """The measured-fastest candidate's function for this site (weights are argument 1,
        streamed from memory); raises _TakeOriginal where XLA's dense product is chosen, or
        where a kernel wins by less than :data:`KERNEL_MARGIN`. ``check``: every candidate
        computes the same product (checked against XLA's on the device before timing)."""
        choice = _with_margin(choose_streaming(op, signature, cands, specs, weight_args=(1,),
                                               baseline="xla_dense", check=check), cands)
        self.choices[key] = choice
        if choice.name == "xla_dense":
            raise _TakeOriginal
        return next(c.fn for c in cands if c.name == choice.name)

    def _down(self, key, role, x2, w2):
        rows = math.prod(x2.shape[:-1])
        why = self._kernel_unsupported(w2.shape, w2.dtype, rows)
        interpret = self.interpret

        def dense(x, w):
            return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(jnp.result_type(x, w))

        cands = [path_choice.Candidate(name, _down_kernel(interpret, tiles),
                                       why or (_ONE_ROW_MMA if tiles.get("mma") and rows == 1 else None),
                                       f"sparse-input GEMV (Pallas, {label})")
                 for name, (label, tiles) in DOWN_VARIANTS.items()]
        cands.append(path_choice.Candidate("xla_dense", dense, None, "XLA dense"))
        cands.append(_pad2_candidate(dense, rows))
        sample = _sparse_sample((rows, w2.shape[0]), x2.dtype, role.density)   # as the site calls it
        signature = (f"M{rows}|K{w2.shape[0]}|N{w2.shape[1]}|{jnp.dtype(w2.dtype).name}|"
                     f"density{role.density:.3f}")
        fn = self._chosen(key, "sparse_input_gemv", signature, cands,
                          [sample, jax.ShapeDtypeStruct(w2.shape, w2.dtype)])
        return fn(x2.reshape(rows, -1), w2).reshape(*x2.shape[:-1], w2.shape[1])

    def _up(self, key, role, x2, w_t, live):
        rows = math.prod(x2.shape[:-1])
        why = self._kernel_unsupported(w_t.shape, w_t.dtype, rows)
        interpret = self.interpret

        def kernel(x, w, lv):
            return sog.sparse_output_gemv(x, w, lv, impl="masked", interpret=interpret)

        def kernel_mma(x, w, lv):
            return sog.sparse_output_gemv(x, w, lv, impl="masked", interpret=interpret, **UP_MMA_TILES)

        def dense(x, w, lv):
            del lv      # the dense product computes every output; dead ones are multiplied by 0
            return jnp.dot(x, w.T, preferred_element_type=jnp.float32).astype(jnp.result_type(x, w))

        cands = [path_choice.Candidate("sparse_output", kernel, why,
                                       "sparse-output GEMV (Pallas)"),
                 path_choice.Candidate("sparse_output_mma", kernel_mma,
                                       why or (_ONE_ROW_MMA if rows == 1 else None),
                                       "sparse-output GEMV (Pallas, tensor cores)"),
                 path_choice.Candidate("xla_dense", dense, None, "XLA dense"),
                 _pad2_candidate(dense, rows)]
        union = 1.0 - (1.0 - role.density) ** rows
        # int32, as the kernel reads it (the site converts its mask where XLA computes it)
        live_sample = (np.random.default_rng(0).random(w_t.shape[0]) < union).astype(np.int32)
        signature = (f"M{rows}|N{w_t.shape[0]}|K{w_t.shape[1]}|{jnp.dtype(w_t.dtype).name}|"
                     f"density{role.density:.3f}")
        # Not checked against XLA: the kernel writes zeros at dead outputs, XLA computes them.
        fn = self._chosen(key, "sparse_output_gemv", signature, cands,
                          [jax.ShapeDtypeStruct((rows, w_t.shape[1]), x2.dtype),
                           jax.ShapeDtypeStruct(w_t.shape, w_t.dtype), live_sample], check=False)
        return fn(x2.reshape(rows, -1), w_t, live.astype(jnp.int32)).reshape(*x2.shape[:-1], w_t.shape[0])

    def _gate(self, key, eqn, operand, x, w):
        return self._plain(key, eqn, operand, x, w)

    def _plain(self, key, eqn, operand, x, w):
        """A dense product (a gate, or any unruled weight at decode): XLA's, XLA's with the
        single row padded to two, or a streaming GEMV kernel with every row live (the
        row-streaming one where the weight is stored output-major, the sparse-input one
        where its contracted dims lead), whichever measures fastest; unmeasured (CPU, no
        table entry), XLA's own equation."""
        site = self.sites_by_key[key]
        if direct_site_reason(site, site.layout) is not None:
            return None
        (lc, rc), _ = eqn.params["dimension_numbers"]
        w_contract = tuple(rc if operand == 1 else lc)
        nd = w.ndim
        out_major = w_contract == tuple(range(nd - len(w_contract), nd))
        in_major = w_contract == tuple(range(len(w_contract)))
        if not (out_major or in_major):
            return None
        interpret = self.interpret

        def gemv(x2):
            rows = math.prod(x2.shape[:-1])
            k = x2.shape[-1]
            w2 = w.reshape(-1, k) if out_major else w.reshape(k, -1)
            why = self._kernel_unsupported(w2.shape, w2.dtype, rows)
            if out_major:
                def kernel(xx, ww):
                    every = jnp.ones((ww.shape[0],), bool)
                    return sog.sparse_output_gemv(xx, ww, every, impl="masked", interpret=interpret)

                def dense(xx, ww):
                    return jnp.dot(xx, ww.T, preferred_element_type=jnp.float32).astype(
                        jnp.result_type(xx, ww))
                name, label = "row_gemv", "row-streaming GEMV (Pallas, every output)"
            else:
                def kernel(xx, ww):
                    return sig.sparse_input_gemv(xx, ww, impl="masked", interpret=interpret,
                                                 **DOWN_VARIANTS["sparse_input_split"][1])

                def dense(xx, ww):
                    return jnp.dot(xx, ww, preferred_element_type=jnp.float32).astype(
                        jnp.result_type(xx, ww))
                name, label = "stream_gemv", "streaming GEMV (Pallas sparse-input kernel, every row)"
            cands = [path_choice.Candidate("xla_dense", dense, None, "XLA dense"),
                     _pad2_candidate(dense, rows),
                     path_choice.Candidate(name, kernel, why, label)]
            n_out = w2.shape[0] if out_major else w2.shape[1]
            signature = f"M{rows}|N{n_out}|K{k}|{jnp.dtype(w2.dtype).name}|{name}"
            fn = self._chosen(key, "dense_gemv", signature, cands,
                              [jax.ShapeDtypeStruct((rows, k), x2.dtype),
                               jax.ShapeDtypeStruct(w2.shape, w2.dtype)])
            return fn(x2.reshape(rows, -1), w2).reshape(*x2.shape[:-1], n_out)

        return matmul_at_site(eqn, operand, x, gemv)


# Down-projection kernels the site measures against XLA (name: (label, tiles); the
# masked path unless the tiles name another impl): the one-tile grid the first H200
# sweep found best at 90% zeros, the split-K loop with partial sums that removes its
# fixed cost (no zeroed output, no atomics), and the rows path whose time follows the
# live rows (in-kernel compaction, one launch plus XLA's sum of the partials; its tiles are
# the H200 sweep's best at 8192² and 50% and 90% zeros, benchmarks/results/sparse_input_sweep.md).
DOWN_VARIANTS = {
    "sparse_input": ("masked bk64 bn256", dict(bk=64, bn=256)),
    "sparse_input_split": ("masked bk64 bn256, 4 steps, partial sums",
                           dict(bk=64, bn=256, steps=4, partials=True)),
    "sparse_input_rows": ("rows bc16 span128, 8 column strips, partial sums",
                          dict(impl="rows", bc=16, span=128, col_splits=8, partials=True)),
    # Several tokens: the tensor cores, 8 row tiles per program into partial sums (the tiles
    # of the Spark FFN layer's down projection, the H200 sweep at batch 4 and 8).
    "sparse_input_mma": ("masked bk64 bn256, tensor cores, 8 steps, partial sums",
                         dict(mma=True, bk=64, bn=256, steps=8, partials=True, num_stages=3)),
}
# The up projection's tensor-core tiles (the Spark FFN layer's up kernel at batch 4 and 8).
UP_MMA_TILES = dict(mma=True, bj=32, bk=256)
_ONE_ROW_MMA = "one row: the tensor-core form would pad it to 16"


# A kernel must beat XLA by this much in isolation to be taken: in the step it also breaks
# XLA's fusion of its producer and adds a launch, which the site measurement does not see
# (the first H200 sweep: every site measured its kernel faster, the step ran 5% slower).
KERNEL_MARGIN = (0.95, 1.5)        # (fraction of XLA's time, µs)
_XLA_PATHS = ("xla_dense", "xla_pad2")


def _with_margin(choice, cands):
    """``choice``, or the fastest XLA path where a measured kernel wins by less than the margin."""
    times = choice.times_us
    xla = {n: times[n] for n in _XLA_PATHS if n in times}
    if choice.name in _XLA_PATHS or choice.name not in times or not xla:
        return choice
    best = min(xla, key=xla.get)
    if times[choice.name] <= KERNEL_MARGIN[0] * xla[best] - KERNEL_MARGIN[1]:
        return choice
    c = next(c for c in cands if c.name == best)
    return dataclasses.replace(choice, name=c.name, label=c.label)


def _pad2_candidate(dense, rows):
    """XLA's dense product with one token padded to two rows: the first H200 sweep timed
    XLA's batch-1 GEMV slower than its batch-2 GEMM (8192x8192: 44.5 vs 36.5 us; a
    2304x13824 gated FFN: 87 vs 54 us). Only offered at one row."""
    def padded(x, w, *rest):
        # The barrier keeps XLA's simplifier from sinking the [:1] slice back into the dot.
        x_pad = jax.lax.optimization_barrier(jnp.pad(x, ((0, 1), (0, 0))))
        return dense(x_pad, w, *rest)[:1]
    return path_choice.Candidate("xla_pad2", padded, None if rows == 1 else "not a single row",
                                 "XLA dense, the row padded to two")


def _down_kernel(interpret, tiles):
    tiles = {"impl": "masked", **tiles}

    def kernel(x, w):
        return sig.sparse_input_gemv(x, w, interpret=interpret, **tiles)
    return kernel


# Calibrated densities are measured (0.598, 0.601, ...): rounded to this step, sites whose
# inputs are equally sparse share one signature, so one measurement serves them all.
DENSITY_STEP = 0.05


def _density_class(density: float) -> float:
    """``density`` rounded to :data:`DENSITY_STEP` (at least one step: a site never measures
    at an all-zero input)."""
    return max(DENSITY_STEP, min(1.0, round(density / DENSITY_STEP) * DENSITY_STEP))


def _sparse_sample(shape, dtype, density: float):
    """A concrete input shaped like a top-k activation: each token keeps ``density`` of its
    entries, independently (so the union grows with the batch as real tokens' does).
    A numpy array: this runs while the program is traced, where ``jnp.asarray`` would make
    a tracer, which the measurement (run outside the trace) cannot take as an input."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    x[rng.random(shape) >= density] = 0.0
    return x.astype(jnp.dtype(dtype))


def ffn_roles(sfn, traced, *, plain: bool = False) -> tuple[dict[str, dict], dict[str, list]]:
    """What each unruled weight site of ``traced`` is in a :class:`SparkTopK` FFN, or as the
    matmul of an input an activation threshold makes sparse. With ``plain`` (``lower(
    dense_gemv=True)``), every other unruled 2-D weight is a plain GEMV site even in a
    function with no activation rule.

    Returns ``({path: {site key: _Role}}, {path: [sites]})`` for the program ``traced``
    (a call's own trace: its keys are where its eqns sit).
    """
    sites_by_path: dict[str, list] = {}
    for s in traced.sites:
        sites_by_path.setdefault(s.path, []).append(s)
    ruled = {slot.path for slot in sfn._slots if slot.rule is not None}
    roles: dict[str, dict] = {}
    for act_site, rule in sfn._activation_plan(traced):
        if act_site.kind != "ffn" or not isinstance(rule, SparkTopK):
            continue
        density = min(1.0, rule.kept_per_row(act_site.width) / act_site.width)
        down_path = act_site.paths[-1]
        gate_key = None
        for path in act_site.paths[:-1]:
            for s in sites_by_path.get(path, []):
                if s.key == act_site.key:
                    gate_key = s.key
        for path in act_site.paths:
            for s in sites_by_path.get(path, []):
                if s.scope != act_site.scope or s.key[:-1] != act_site.key[:-1]:
                    continue                 # another FFN's use of the same leaf
                if s.key == gate_key:
                    kind = "gate"
                elif path == down_path and s.other_shape[-1:] == act_site.shape[-1:]:
                    kind = "down"
                elif gate_key is not None and path != down_path and s.key[-1] > gate_key[-1]:
                    kind = "up"              # after the gate in program order: its mask is ready
                else:
                    continue
                roles.setdefault(path, {})[s.key] = _Role(kind, act_site.key, rule, density,
                                                          act_site.width)
    # Thresholded inputs (TEAL, CATS, CHESS): the hook zeroes the input before the matmul, so
    # the matmul reading it is a sparse-input GEMV (exact at threshold 0) where measured faster.
    calibrated = getattr(sfn, "_threshold_info", {})
    for point, rule in (sfn._thresholds_for(traced) if getattr(sfn, "_thresholds", ()) else ()):
        # The density the path choice measures at: what calibration measured (uncalibrated
        # thresholds are 0 and drop exact zeros only: dense).
        info = calibrated.get(point.name)
        density = 1.0 if info is None else _density_class(1.0 - float(np.mean(info["measured"])))
        if point.kind == "input":
            wanted = {(point.paths[0], point.key)}
        else:       # act(gate) * up is zero where act(gate) was cut: the down matmul's input
            wanted = {(s.path, s.key) for s in down_projection_sites(point, sites_by_path)}
        for path, key in wanted:
            roles.setdefault(path, {}).setdefault(key, _Role("down", None, rule, density,
                                                             point.width))
    # In a function with a lowered Spark FFN (a decode step), or any function lowered with
    # dense_gemv=True, every other unruled weight whose sites are all direct 2-D products: a
    # dense site that may still take XLA's padded-row product or a streaming kernel where
    # measured faster.
    for path, sites in (sites_by_path.items() if roles or plain else ()):
        if path in roles or path in ruled or any(len(s.weight_shape) != 2 for s in sites):
            continue
        if all(s.layout is not None and direct_site_reason(s, s.layout) is None for s in sites):
            roles[path] = {s.key: _Role("plain", None, None, 1.0, 0) for s in sites}
    return {p: r for p, r in roles.items() if p not in ruled}, sites_by_path


def activation_sparse_handlers(sfn, *, backend: str | None = None, interpret: bool = False,
                               dense_gemv: bool = False) -> dict[str, WeightHandler]:
    """Handlers for the unruled weights of every FFN site a :class:`SparkTopK` rule selects
    and of every matmul whose input an activation threshold makes sparse.

    Args:
      sfn: an initialized :class:`~sparsejax.sparsify.SparseFunction`.
      backend: "gpu", "tpu" or "cpu" (default: JAX's default backend).
      interpret: run the kernels in Pallas interpret mode (CPU tests).
      dense_gemv: also every other unruled 2-D weight, with no activation rule in the
        function (see :func:`ffn_roles`).

    Returns:
      ``{path: handler}`` to merge into the lowered function's handlers. Each call's trace
      updates their roles (:meth:`ActivationSparseHandler.rebind` with :func:`ffn_roles`).
    """
    roles, sites_by_path = ffn_roles(sfn, next(iter(sfn._traces.values())), plain=dense_gemv)
    context: dict = {}
    return {path: ActivationSparseHandler(path, sites_by_path[path][0].layout, sites_by_path[path],
                                          site_roles, backend, interpret, context)
            for path, site_roles in roles.items()}
