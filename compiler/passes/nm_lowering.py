"""N:M lowering: N:M-masked matmuls read compressed weights (values + indices).

An ``NM(n, m)`` mask keeps ``n`` of every ``m`` weights along K; stored as
:class:`~sparsejax.kernels.nm_compressed.NMWeight` a 2:4 bf16 weight is 0.56 of
its dense bytes, which a memory-bound decode GEMV can turn into speed
(:func:`~sparsejax.kernels.nm_compressed.nm_matmul`). Each eligible site takes
the compressed kernel or XLA's dense product on the masked weight, whichever is
measured faster on the device for its signature, with the weights streamed from
memory as at decode (:func:`~sparsejax.kernels.streaming_choice.choose_streaming`);
the report says which.

Where the compressed weight comes from:

* frozen (:func:`freeze_packed`, an inference form built once from concrete
  weights): the program reads only the compressed bytes; call ``lower`` and
  ``freeze_packed`` again after the weights change, as after masks change;
* otherwise it is compressed from the dense leaf inside the program, so training
  updates reach the kernel. That costs a full read of the dense weight per call,
  and the path choice times it so: on a GPU such a site stays dense unless
  compressing and multiplying beat XLA.

Entry point: :class:`NMCompressedHandler`, built by ``SparseFunction.lower`` for
each ``NM``-ruled leaf in place of the block-sparse handler.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.compiler.interpreter import bind_eqn
from sparsejax.compiler.param_ref import ParamRef, materialize
from sparsejax.compiler.passes.base import direct_site_reason, matmul_at_site
from sparsejax.kernels.streaming_choice import choose_streaming
from sparsejax.compiler.passes.masking import MaskHandler
from sparsejax.kernels import nm_compressed, path_choice
from sparsejax.rules import NM

__all__ = ["NMCompressedHandler", "pack", "freeze_packed"]


def pack(rule: NM, layout, leaf, mask) -> nm_compressed.NMWeight:
    """The compressed ``(K, N)`` matrix of a non-stacked N:M-masked leaf."""
    return nm_compressed.compress_nm(layout.to_matrix(leaf), rule.n, rule.m,
                                     mask=layout.to_matrix(mask))


class NMCompressedHandler(MaskHandler):
    """A mask handler whose eligible N:M sites run the compressed N:M kernel."""

    def __init__(self, base: MaskHandler, mask, backend: str | None, interpret,
                 packed: nm_compressed.NMWeight | None = None):
        super().__init__(base.rule, base.path, base.layout, base.sites)
        self.leaf_size = base.leaf_size
        self.backend, self.interpret, self.packed = backend, interpret, packed
        self.choices: dict = {}
        self._mask_reason = self._eligibility(np.asarray(mask))
        self._reasons = {s.key: self.site_reason(s) for s in self.sites}

    def site_reason(self, site) -> str | None:
        return self._mask_reason or direct_site_reason(site, self.layout)

    def _eligibility(self, mask: np.ndarray) -> str | None:
        rule, layout = self.rule, self.layout
        if not isinstance(rule, NM):
            return f"{rule.describe()} is not an N:M rule"
        if rule.m > 16:
            return f"m={rule.m} > 16 (indices are packed in at most 4 bits)"
        if rule.gradient != "masked":
            return f"gradient={rule.gradient!r} needs gradients at pruned weights"
        if layout is None or layout.stack_axes:
            return "stacked layers stay on XLA (one compressed matrix per leaf)"
        groups = layout.to_matrix(mask).reshape(layout.k // rule.m, rule.m, layout.n)
        if groups.sum(axis=1).max(initial=0) > rule.n:
            return f"the mask keeps more than {rule.n} of some group of {rule.m}"
        return None

    def site_path(self, key) -> str:
        reason = self._reasons.get(key, "not a site found at init")
        if reason is not None:
            return f"XLA ({reason})"
        if key in self.choices:
            return self.choices[key].summary()
        return f"compressed {self.rule.n}:{self.rule.m} GEMV where measured faster than XLA"

    def make_input(self, item, mask) -> ParamRef:
        ref = super().make_input(item, mask)
        if any(r is None for r in self._reasons.values()):
            packed = self.packed if self.packed is not None else pack(self.rule, self.layout, item, mask)
            ref = ref.replace(state=packed)
        return ref

    def on_site(self, interp, eqn, key, invals, scope):
        operand = 0 if isinstance(invals[0], ParamRef) else 1
        ref = invals[operand]
        if self._reasons.get(key, "not a site found at init") is not None or ref.state is None:
            return bind_eqn(eqn, [materialize(x) for x in invals])
        x = invals[1 - operand]
        site = next(s for s in self.sites if s.key == key)
        rows = max(1, int(np.prod(site.other_shape)) // self.layout.k)
        kernel, choice = self._choose(key, rows, x.dtype, ref.state)
        if choice.name != "nm_kernel":       # XLA's dense product on the masked weight, as before
            return bind_eqn(eqn, [materialize(v) for v in invals])
        packed = ref.state
        return matmul_at_site(eqn, operand, x, lambda x2: kernel(
            x2, None, packed.values, packed.meta))

    def _choose(self, key, rows, x_dtype, packed):
        backend, interpret = self.backend, self.interpret
        dtype = jnp.result_type(x_dtype, packed.dtype)
        why = nm_compressed.supported(packed.shape, dtype, rows, backend=backend,
                                      interpret=interpret)
        static = (packed.shape, packed.n, packed.m, packed.group_tile)

        def kernel(x, w, values, meta):
            del w
            return nm_compressed.nm_matmul(x, nm_compressed.NMWeight(values, meta, *static),
                                           backend=backend, interpret=interpret)

        def compress_then_kernel(x, w, values, meta):
            # Without a packed form the program compresses the dense weight every call:
            # that is what the kernel path costs, so that is what is timed.
            del values, meta
            packed_now = nm_compressed.compress_nm(w, static[1], static[2], group_tile=static[3])
            return kernel(x, None, packed_now.values, packed_now.meta)

        def dense(x, w, values, meta):
            del values, meta
            return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(jnp.result_type(x, w))

        measured = kernel if self.packed is not None else compress_then_kernel
        cands = [path_choice.Candidate("nm_kernel", measured, why,
                                       f"compressed {packed.n}:{packed.m} GEMV (Pallas)"),
                 path_choice.Candidate("xla_dense", dense, None, "XLA dense (masked weight)")]
        specs = [jax.ShapeDtypeStruct((rows, packed.shape[0]), dtype),
                 jax.ShapeDtypeStruct(packed.shape, dtype),
                 jax.ShapeDtypeStruct(packed.values.shape, packed.values.dtype),
                 jax.ShapeDtypeStruct(packed.meta.shape, packed.meta.dtype)]
        signature = (f"M{rows}|K{packed.shape[0]}|N{packed.shape[1]}|{packed.n}:{packed.m}|"
                     f"{jnp.dtype(dtype).name}|{'packed' if self.packed is not None else 'compress per call'}")
        choice = choose_streaming("nm_matmul", signature, cands, specs, weight_args=(1, 2, 3),
                                  baseline="xla_dense")
        self.choices[key] = choice
        return kernel, choice


def freeze_packed(lowered, sparams, sstate) -> None:
    """Compresses every lowered N:M leaf once, from concrete ``sparams``: the inference form.

    Afterwards ``lowered`` reads only the compressed bytes at its N:M sites (the
    compressed arrays enter its programs as constants); it no longer follows
    changes to those weights: call ``lower`` and this again after they change.
    """
    for slot, w, m in zip(lowered._slots, lowered._slot_items(sparams), lowered._slot_masks(sstate)):
        handler = lowered._handlers.get(slot.path)
        if isinstance(handler, NMCompressedHandler) and any(r is None for r in handler._reasons.values()):
            handler.packed = jax.block_until_ready(pack(handler.rule, handler.layout, w, m))
    lowered._rewrites = {}
