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

Never slower than dense: at each eligible site the kernel is one candidate
among XLA's masked dense product (and the plain-JAX reference);
:func:`sparsejax.kernels.path_choice.choose` measures them once per signature
on the accelerator (forward, or forward + backward when the program is being
differentiated) and the site takes the winner.

Stacked layers (a leaf ``(layers, K, N)`` read inside ``nn.scan``): each layer
has its own tables; they are padded to a common capacity and held as device
arrays beside the ``(layers, capacity, bk, bn)`` gathered blocks, so the scan
slices both and the kernel reads the layer's tables as operands.

Packed (``lower(..., packed=True)``): the lowered leaves are held as their kept
blocks only (memory ∝ density; :meth:`LoweringHandler.pack_leaf`), the program
computes from them, and any other use of the weight scatters them back to dense.

Sibling sites (``lower(..., fuse_siblings=True)``: q/k/v, gate/up) may run as one kernel over
their concatenated weights: :mod:`sparsejax.compiler.passes.sibling_fusion`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import masks as mask_math
from sparsejax.compiler import views
from sparsejax.compiler.interpreter import bind_eqn
from sparsejax.compiler.param_ref import ParamRef, materialize
from sparsejax.compiler.passes.base import PathChoosing, direct_site_reason, matmul_at_site
from sparsejax.compiler.passes.masking import MaskHandler
from sparsejax.kernels import block_sparse
from sparsejax.kernels import path_choice
from sparsejax.layout import WeightLayout
from sparsejax.rules import Block

OP = "block_sparse_matmul"


class BlockSparseHandler(PathChoosing, MaskHandler):
    """A mask handler whose eligible sites choose between the block-sparse kernel and XLA."""

    def __init__(self, base: MaskHandler, mask, backend: str | None, interpret,
                 packed: bool = False, premasked: bool = False):
        super().__init__(base.rule, base.path, base.layout, base.sites)
        self.leaf_size = base.leaf_size
        self.backend, self.interpret = backend, interpret
        self.tables = None          # BlockTables (one matrix) or TableBounds (stacked layers)
        self.index = None           # numpy BlockIndex (stacked layers)
        self.choices = {}
        # site key -> (the sibling paths it is grouped with, the group's Choice or None before
        # the group is traced): sites fused with their siblings (``lower(fuse_siblings=True)``)
        self.siblings: dict = {}
        self._mask_reason = self._eligibility(np.asarray(mask))
        self._reasons = {s.key: self.site_reason(s) for s in self.sites}
        self.packed = packed and self._mask_reason is None
        # The caller promises (and SparseFunction checks on concrete params) that the dense
        # leaf is zero outside the mask: XLA's candidate is then the plain dense product.
        self.premasked = premasked

    # -- setup ----------------------------------------------------------------------

    def _eligibility(self, mask: np.ndarray) -> str | None:
        rule, layout = self.rule, self.layout
        if rule.gradient != "masked":
            return f"gradient={rule.gradient!r} needs gradients at pruned weights"
        if layout is None:
            return "no single matrix layout"
        nstack = len(layout.stack_axes)
        if layout.stack_axes != tuple(range(nstack)):
            return "stack axes are not the leading axes a scan slices"
        block = tuple(rule.block) if isinstance(rule, Block) else (128, 128)
        shape = (layout.k, layout.n)
        matrices = np.asarray(layout.to_matrix(mask)).reshape(-1, *shape)
        try:
            block_masks = [block_sparse.block_mask_of(m, shape, block) for m in matrices]
        except ValueError:
            return f"mask is not made of whole {block} blocks"
        if nstack == 0:
            self.tables = block_sparse.tables_of(block_masks[0], shape, block)
        else:
            bounds, index = block_sparse.stacked_tables(block_masks, shape, block)
            stack = layout.stack_shape
            self.tables = bounds
            self.index = block_sparse.BlockIndex(*(a.reshape(*stack, *a.shape[1:]) for a in index))
        self._block_counts = np.asarray([b.sum(axis=0) for b in block_masks])   # (layers, N_blocks)
        self.block_masks = np.asarray(block_masks)        # (layers, K_blocks, N_blocks)
        return None

    def site_reason(self, site) -> str | None:
        return self._mask_reason or direct_site_reason(site, self.layout)

    @property
    def stacked(self) -> bool:
        return self.index is not None

    def _gather(self, matrix) -> block_sparse.BlockSparseWeight:
        """Kept blocks of the ``(*stack, K, N)`` matrix view, with their tables."""
        if not self.stacked:
            return block_sparse.BlockSparseWeight(
                block_sparse.gather_blocks(matrix, self.tables), self.tables)
        stack = self.layout.stack_shape
        flat = block_sparse.BlockIndex(*(jnp.asarray(a.reshape(-1, *a.shape[len(stack):]))
                                         for a in self.index))
        blocks = block_sparse.gather_indexed(matrix.reshape(-1, *matrix.shape[-2:]), self.tables, flat)
        index = block_sparse.BlockIndex(*(jnp.asarray(a) for a in self.index))
        return block_sparse.BlockSparseWeight(blocks.reshape(*stack, *blocks.shape[1:]), self.tables,
                                              index)

    # -- packed weights -------------------------------------------------------------

    def pack_leaf(self, leaf) -> jax.Array:
        """The kept blocks of a dense leaf: ``(*stack, capacity, bk, bn)``, what a packed model holds."""
        return self._gather(self.layout.to_matrix(jnp.asarray(leaf))).blocks

    def packed_shape(self) -> tuple[int, ...]:
        bk, bn = self.tables.block
        return (*self.layout.stack_shape, self.tables.num_blocks, bk, bn)

    def params_after(self, density: float) -> int:
        if self.packed:   # what memory really holds: kept blocks, padded to a common capacity
            return math.prod(self.packed_shape())
        return super().params_after(density)

    # -- report ---------------------------------------------------------------------

    def site_path(self, key) -> str:
        reason = self._reasons.get(key)
        if reason is not None:
            return f"XLA ({reason})"
        if key in self.siblings:
            others, choice = self.siblings[key]
            with_ = f"with {', '.join(others)}"
            if choice is None:
                return f"fusable {with_} (path chosen when traced)"
            if choice.name != "separate":
                return f"fused {with_}: {choice.summary()}"
            return f"{self._own_path(key)}; not fused {with_}: {choice.summary()}"
        return self._own_path(key)

    def _own_path(self, key) -> str:
        ok, why = self._kernel_support(self._site_dtype(key))
        no_kernel = "" if ok else f"; {why}"
        chosen = self.chosen_path(key)
        if chosen is not None:
            return chosen + (f" ({why})" if not ok else "")
        return f"{why if ok else 'XLA dense masked matmul'} (path chosen when traced{no_kernel})"

    def _site_dtype(self, key):
        return next(s for s in self.sites if s.key == key).dtype

    def _kernel_support(self, dtype) -> tuple[bool, str]:
        why = block_sparse.supported((self.layout.k, self.layout.n), dtype, self.tables.block,
                                     backend=self.backend, interpret=self.interpret)
        if why is None:
            return True, block_sparse.describe(self.backend, self.interpret)
        # Here XLA's masked product, not the kernel's reference, replaces a missing kernel.
        return False, why.removesuffix(": plain-JAX reference")

    # -- computing ------------------------------------------------------------------

    def make_input(self, item, mask) -> ParamRef:
        if self.packed:
            blocks = jnp.asarray(item)
            state = block_sparse.BlockSparseWeight(blocks, self.tables, None if not self.stacked else
                                                   block_sparse.BlockIndex(*(jnp.asarray(a) for a in
                                                                             self.index)))
            return ParamRef.for_leaf(self.path, None, len(self.layout.shape), state=state,
                                     handler=self)
        if self.premasked:
            ref = ParamRef.for_leaf(self.path, mask_math.masked_gradient(item, mask), item.ndim,
                                    mask=mask, handler=self)
        else:
            ref = super().make_input(item, mask)
        if self.tables is None:
            return ref
        return ref.replace(state=self._gather(self.layout.to_matrix(item)))

    def materialize(self, ref: ParamRef):
        """Dense value of a packed leaf for a use that is not a lowered site (scatter, then view)."""
        consumed = [a for a in self.layout.stack_axes if a in ref.consumed]
        layout = self.layout
        if consumed:  # a scan sliced the leading stack axes off state and value alike
            c = len(consumed)
            layout = WeightLayout(layout.shape[c:], tuple(a - c for a in layout.stack_axes[c:]),
                                  tuple(a - c for a in layout.contract_axes),
                                  tuple(a - c for a in layout.free_axes))
        return views.replay_pending(ref, layout.from_matrix(ref.state.to_dense()))

    @property
    def _density(self) -> float:
        """The kept fraction of blocks (over every layer of a stack)."""
        counts = self._block_counts
        kb, nb = self.tables.grid
        return float(counts.sum() / (counts.shape[0] * kb * nb))

    def _signature(self, m: int, dtype) -> str:
        """What decides the winner besides the device. The longest column is rounded up to a
        power of two, so unrolled layers at one density share a measurement."""
        (k, n), (bk, bn) = self.tables.shape, self.tables.block
        counts = self._block_counts
        density = self._density
        longest = int(counts.max(initial=0))
        longest = 1 << (longest - 1).bit_length() if longest else 0
        return (f"M={m},K={k},N={n},dtype={jnp.dtype(dtype).name},block={bk}x{bn},"
                f"density={density:.3f},max_col<={longest},mean_col={counts.mean():.2f},"
                f"tables={'device' if self.stacked else 'static'}"
                # XLA's candidate differs: a plain dense product when the leaf is pre-masked.
                + (",premasked" if self.premasked else ""))

    def _candidates(self, dtype, m: int):
        """The site's paths as functions of ``(x2, w)``, ``w`` the dense ``(K, N)`` weight,
        for ``m`` rows of ``x2``.

        Each includes what the program does around the product: the kernel, the kept blocks'
        product in XLA ops and the reference gather the kept blocks (and scatter ``dW``
        back), XLA multiplies by the mask. A stacked leaf is measured on its first layer's
        tables (the signature carries the whole stack's column counts).
        """
        ok, why = self._kernel_support(dtype)
        mask = self.mask_matrix(0)
        backend, interpret = self.backend, self.interpret
        gather = self.first_layer_weight

        return [
            path_choice.Candidate(
                "kernel", lambda x, w: block_sparse.block_sparse_matmul(
                    x, gather(w), backend=backend, interpret=interpret),
                None if ok else why, f"block-sparse kernel ({why})"),
            path_choice.Candidate("xla_dense", lambda x, w: jnp.matmul(x, w * mask),
                                  describe="XLA dense masked matmul")
            if not self.premasked else
            path_choice.Candidate("xla_dense", lambda x, w: jnp.matmul(x, w),
                                  describe="XLA dense matmul (pre-masked weight)"),
            # At a few rows (decode) the kernel's row tiles leave most of the GPU idle; the kept
            # blocks' product in XLA ops spreads the work over every kept block.
            path_choice.Candidate(
                "xla_blocks", lambda x, w: block_sparse.block_sparse_matmul_blocks(x, gather(w)),
                None if m <= block_sparse.MAX_ROWS else
                f"{m} rows: the kept blocks' product in XLA ops is offered at up to "
                f"{block_sparse.MAX_ROWS}",
                "XLA product of the kept blocks (gathered rows of x, batched product, "
                "per-column sum)"),
            # The kernel's plain-JAX twin: a candidate only where no kernel runs (it never
            # beats XLA's masked product, so measuring it beside a kernel costs for nothing).
            path_choice.Candidate(
                "reference", lambda x, w: block_sparse.block_sparse_matmul_reference(x, gather(w)),
                None if not ok else "the kernel runs here",
                "block-sparse reference (scatter, XLA dot)"),
        ]

    def first_layer_weight(self, w) -> block_sparse.BlockSparseWeight:
        """The kept blocks of a dense ``(K, N)`` weight by the first layer's tables: what a path
        measurement multiplies by (a stacked leaf's signature carries the whole stack's counts)."""
        if not self.stacked:
            return block_sparse.BlockSparseWeight(block_sparse.gather_blocks(w, self.tables),
                                                  self.tables)
        nstack = len(self.layout.stack_shape)
        ix = block_sparse.BlockIndex(*(jnp.asarray(np.asarray(a).reshape(-1, *a.shape[nstack:])[0])
                                       for a in self.index))
        return block_sparse.BlockSparseWeight(block_sparse.gather_indexed(w, self.tables, ix),
                                              self.tables, ix)

    def mask_matrix(self, layer: int = 0) -> np.ndarray:
        """The ``(K, N)`` element mask of one layer (XLA's candidate multiplies by it)."""
        (k, n), (bk, bn) = self.tables.shape, self.tables.block
        return np.kron(self.block_masks[layer], np.ones((bk, bn), bool))[:k, :n]

    def on_site(self, interp, eqn, key, invals, scope):
        operand = 0 if isinstance(invals[0], ParamRef) else 1
        ref = invals[operand]
        if self._reasons.get(key, "not a site found at init") is not None or ref.state is None:
            return bind_eqn(eqn, [materialize(x) for x in invals])
        state = ref.state
        if state.blocks.ndim != 3:   # a stacked leaf used without a scan slicing it
            return bind_eqn(eqn, [materialize(x) for x in invals])
        x = invals[1 - operand]
        # The dtype the original dot multiplies in (Flax casts float32 params to the compute
        # dtype before the dot): the kept blocks are cast alike, so the kernel sees bf16.
        dtype = jnp.result_type(*(v.aval.dtype for v in eqn.invars[:2]))
        state = block_sparse.BlockSparseWeight(state.blocks.astype(dtype), state.tables, state.index)
        k, n = self.tables.shape
        m = math.prod(x.shape) // k
        specs = [jax.ShapeDtypeStruct((m, k), dtype), jax.ShapeDtypeStruct((k, n), dtype)]
        # A pre-masked leaf's XLA candidate multiplies the weight as given, which the random
        # measurement weight is not: the candidates agree only on masked weights.
        # The kernel's work (the least of the candidates'): where even it is compute-bound,
        # the inputs' place (L2 or HBM) does not decide the timing and two input sets do.
        choice = self._choose(key, OP, self._signature(m, dtype), self._candidates(dtype, m), specs,
                              check=not self.premasked, flops=2.0 * m * k * n * self._density)
        if choice.name == "xla_dense":
            return bind_eqn(eqn, [materialize(x) for x in invals])
        if choice.name == "reference":
            fn = lambda x2: block_sparse.block_sparse_matmul_reference(x2, state)
        elif choice.name == "xla_blocks":
            fn = lambda x2: block_sparse.block_sparse_matmul_blocks(x2, state)
        else:
            fn = lambda x2: block_sparse.block_sparse_matmul(
                x2, state, backend=self.backend, interpret=self.interpret)
        return matmul_at_site(eqn, operand, x, fn)
