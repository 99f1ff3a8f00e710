"""The lowering pass: masked matmuls with block structure become block-sparse kernels.

Masks alone make nothing faster. Once masks are fixed (inference, or between
mask updates in training), :meth:`SparseFunction.lower` swaps each masked dot
site whose mask keeps whole ``(bk, bn)`` blocks for
:func:`sparsejax.kernels.block_sparse.block_sparse_matmul`, whose work is
proportional to the kept blocks. Index tables are built once, on the host, from
the concrete mask; the kept blocks are gathered from the dense weight in the
program, so training updates reach the kernel and gradients reach the kept
blocks only (the "masked" gradient mode). Every site that cannot take the
kernel stays on XLA, and the report says why.
"""

from __future__ import annotations

import numpy as np

from sparsejax.compiler.interpreter import bind_eqn
from sparsejax.compiler.param_ref import ParamRef, materialize
from sparsejax.compiler.passes.base import direct_site_reason, matmul_at_site
from sparsejax.compiler.passes.masking import MaskHandler
from sparsejax.kernels import block_sparse
from sparsejax.rules import Block


class BlockSparseHandler(MaskHandler):
    """A mask handler whose eligible sites run the block-sparse kernel."""

    def __init__(self, base: MaskHandler, mask, backend: str | None, interpret):
        super().__init__(base.rule, base.path, base.layout, base.sites)
        self.leaf_size = base.leaf_size
        self.backend, self.interpret = backend, interpret
        self.tables = None
        reason = self._eligibility(np.asarray(mask))
        self._reasons = {s.key: reason or direct_site_reason(s, self.layout) for s in self.sites}

    def _eligibility(self, mask: np.ndarray) -> str | None:
        rule, layout = self.rule, self.layout
        if rule.gradient != "masked":
            return f"gradient={rule.gradient!r} needs gradients at pruned weights"
        if layout is None or layout.stack_axes:
            return "stacked layers (per-layer block tables) stay on XLA"
        block = tuple(rule.block) if isinstance(rule, Block) else (128, 128)
        try:
            block_mask = block_sparse.block_mask_of(layout.to_matrix(mask), (layout.k, layout.n), block)
        except ValueError:
            return f"mask is not made of whole {block} blocks"
        self.tables = block_sparse.tables_of(block_mask, (layout.k, layout.n), block)
        return None

    def site_path(self, key) -> str:
        reason = self._reasons.get(key)
        if reason is not None:
            return f"XLA ({reason})"
        site = next(s for s in self.sites if s.key == key)
        ok, why = block_sparse.supported((self.layout.k, self.layout.n), site.dtype,
                                         "interpret" if self.interpret else self.backend,
                                         self.tables.block)
        return why if ok else f"reference ({why})"

    def make_input(self, item, mask) -> ParamRef:
        ref = super().make_input(item, mask)
        if self.tables is None:
            return ref
        packed = block_sparse.BlockSparseWeight(
            block_sparse._gather_blocks(self.layout.to_matrix(item), self.tables), self.tables)
        return ref.replace(state=packed)

    def on_site(self, interp, eqn, key, invals, scope):
        operand = 0 if isinstance(invals[0], ParamRef) else 1
        ref = invals[operand]
        if self._reasons.get(key, "not a site found at init") is not None or ref.state is None:
            return bind_eqn(eqn, [materialize(x) for x in invals])
        return matmul_at_site(eqn, operand, invals[1 - operand],
                              lambda x2: block_sparse.block_sparse_matmul(
                                  x2, ref.state, backend=self.backend, interpret=self.interpret))
