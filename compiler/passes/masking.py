"""The mask pass: a masked leaf enters the program as ``apply_mask(w, mask)``.

The masked value is formed once where the leaf enters and flows, as a ParamRef,
to every matmul, conv or other use, inside scans, conds and remat alike; so
``sparsify`` with mask rules computes exactly ``fn(params * mask)`` while the
gradient follows the rule's mode. The lowering pass (``lowering.py``) reuses the
ref's site-view mask to swap dots for the block-sparse kernel; no N:M lowering is
built (N:M-masked sites stay on XLA; ``kernels.nm_compressed`` is called directly).
"""

from __future__ import annotations

from sparsejax import masks as mask_math
from sparsejax.compiler.param_ref import ParamRef
from sparsejax.compiler.passes.base import WeightHandler


class MaskHandler(WeightHandler):

    def init(self, leaf, key):
        self.leaf_size = leaf.size
        return leaf, self.rule.mask_for(self.path, leaf, self.layout, key)

    @property
    def size(self) -> int:
        return self.leaf_size

    def make_input(self, item, mask) -> ParamRef:
        rule = self.rule
        value = mask_math.apply_mask(item, mask, rule.gradient, rule.srste_decay)
        return ParamRef.for_leaf(self.path, value, item.ndim, mask=mask, handler=self)
