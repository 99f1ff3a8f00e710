"""The factorization pass: Monarch and block-diagonal weights.

A factorized leaf exists in the sparse params only as factors; it enters the
program as a ParamRef with no dense value. At a matmul whose layout matches the
one the factors were built for, the site computes ``x @ W`` by its fastest
correct path (:mod:`sparsejax.kernels.path_choice`, measured once per signature
on an accelerator): the einsums of the reference (the default, and the only
choice on CPU), the fused Monarch kernel, the two factors as block-sparse products on
the block-sparse kernel (:mod:`sparsejax.kernels.monarch_block_sparse`: no transpose of
the intermediate), or the dense matrix rebuilt from the factors and one XLA dot. A
stacked leaf sliced by a scan or indexed per layer (``w[i]`` in a fori_loop) multiplies
by that layer's factors. Any other use (a tied weight read as an embedding, a weight
scaled or transposed first) materializes the dense matrix: right, just not fast; the
report's compute column says which sites took which path.

For inference, ``lower(premasked=True)`` gives each factorized leaf its dense product
as well (``premask`` multiplies the factors out once, stored beside them under
``STORED_DENSE``): a site then also weighs the dense program's own dot on that stored
matrix, which wins where the factored product is slower than dense (few tokens, small
factors), so the site is never slower than the dense model there.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import jax
import jax.numpy as jnp

from sparsejax import monarch
from sparsejax.compiler import views
from sparsejax.compiler.interpreter import bind_eqn
from sparsejax.compiler.param_ref import ParamRef, materialize
from sparsejax.compiler.passes.base import (PathChoosing, WeightHandler, direct_site_reason,
                                             matmul_at_site)
from sparsejax.kernels import monarch_block_sparse, monarch_matmul, path_choice
from sparsejax.layout import WeightLayout
from sparsejax.rules import BlockDiagonal, Monarch


class _Kind:
    """The factor math one rule uses."""

    def __init__(self, project, init, to_dense, einsum, param_count, flops_kind, kernel=None):
        self.project, self.init, self.to_dense = project, init, to_dense
        self.einsum, self.param_count, self.flops_kind = einsum, param_count, flops_kind
        self.kernel = kernel      # (matmul, why_not) of a fused kernel, if the kind has one


def fused_monarch(x2, factors, out_features):
    """The fused Monarch kernel: the one call site, so a new kernel drops in here."""
    return monarch_matmul.monarch_matmul(x2, factors, out_features, impl="kernel")


# Below this many tokens (decode) the fused kernel is not a candidate: it pads the tokens to
# its 64-row tile, lost to the einsums at every decode shape measured on the H200 (M = 1:
# 18.9 / 35.1 / 30.3 µs against 12.3 / 19.1 / 18.1 µs; M = 8: 20.0 against 13.2 µs) and took
# about 60 s to compile at each, where every other candidate took about one.
FUSED_MIN_TOKENS = 64


def fused_monarch_unsupported(x_shape, factors) -> str | None:
    """Why :func:`fused_monarch` cannot run these shapes here (None if it can)."""
    if jax.default_backend() != "gpu":
        return "the fused Monarch kernel runs on GPU (interpret mode in its own tests)"
    if x_shape[0] < FUSED_MIN_TOKENS:
        return (f"{x_shape[0]} tokens (decode): the fused kernel's 64-row tiles lose to the "
                f"einsums below {FUSED_MIN_TOKENS} tokens")
    return monarch_matmul.supported(x_shape, factors)


# Below this many tokens (decode) the block-sparse Monarch path is not a candidate either: the
# block-sparse kernel pads the tokens to its 128-row tiles, and where the tokens are few the
# einsums, or the stored dense product, read each weight once (unmeasured at decode: kept out
# so a decode step does not compile the kernels for a path with nothing to win there).
BLOCK_SPARSE_MIN_TOKENS = 64


def block_sparse_monarch_unsupported(x_shape, factors) -> str | None:
    """Why the two-block-sparse-products path cannot run these shapes here (None if it can)."""
    if x_shape[0] < BLOCK_SPARSE_MIN_TOKENS:
        return (f"{x_shape[0]} tokens (decode): the block-sparse kernel pads them to its "
                f"128-row tiles")
    return monarch_block_sparse.supported(x_shape, factors)


def monarch_einsums(x2, factors, out_features):
    """The einsum path: bf16 backward einsums on GPU, the float32-exact reference elsewhere."""
    return monarch_matmul.monarch_matmul(x2, factors, out_features, impl=None)


def _other_permutation(x_shape, factors, out_features, unflat) -> path_choice.Candidate:
    """The Monarch einsums with the other spelling of the permutation ``P1`` than the
    default (``monarch_matmul_einsum(block_runs=...)``: ``w1``'s rows reordered so ``P1``
    moves contiguous runs, or ``P1`` as a minor-axis transpose). The default is a rule of
    thumb (``8 p <= tokens``); which is faster at a shape is measured on the device."""
    nb, q, p = factors["w1"].shape[-3:]
    default = 8 * p <= x_shape[0]
    other = not default
    why = None
    if jax.default_backend() != "gpu":
        why = "timed on a GPU only (elsewhere the einsum path is the float32 reference)"
    elif other and q % nb:
        why = f"q = {q} is not a multiple of nblocks = {nb}: no block-major rows"
    label = ("Monarch einsums, w1 rows block-major" if other
             else "Monarch einsums, P1 as a transpose")
    return path_choice.Candidate(
        "einsum_runs" if other else "einsum_transpose",
        lambda x, *f: monarch_matmul.monarch_matmul_einsum(x, unflat(f), out_features,
                                                           block_runs=other),
        why, label)


_KINDS = {
    Monarch: _Kind(monarch.project, monarch.init_factors, monarch.to_dense,
                   monarch_einsums, monarch.param_count, "monarch",
                   kernel=(fused_monarch, fused_monarch_unsupported)),
    BlockDiagonal: _Kind(monarch.blockdiag_project, monarch.blockdiag_init,
                         monarch.blockdiag_to_dense, monarch.blockdiag_matmul_reference,
                         monarch.blockdiag_param_count, "blockdiag"),
}


# The key of a factorized leaf's stored dense product (``(*stack, K, N)``, beside the factors)
# in a copy lowered with ``premasked=True``.
STORED_DENSE = "dense"


def split_stored(state):
    """``(factors, stored dense product or None)`` of a factorized leaf's state."""
    if isinstance(state, dict) and STORED_DENSE in state:
        return {k: v for k, v in state.items() if k != STORED_DENSE}, state[STORED_DENSE]
    return state, None


# What the dense program computes at a factorized site: ``x @ W`` on the stored ``(K, N)``
# weight. Timed as every site's baseline (the dense model pays no rebuild); the site holds no
# dense weight, so it is never a path it takes.
DENSE_WEIGHT = path_choice.Candidate("dense_weight", lambda x, w: jnp.matmul(x, w),
                                     describe="stored dense weight, XLA dot")


class FactorizedHandler(PathChoosing, WeightHandler):

    def __init__(self, rule, path, layout, sites):
        super().__init__(rule, path, rule.check_layout(path, layout), sites)
        self.kind = _KINDS[type(rule)]
        self._reasons = {s.key: self.site_reason(s) for s in sites}
        self._hoisted: set = set()     # scan bodies whose weight is rebuilt before the scan
        self.stored_dense = False      # lower(premasked=True): the leaf holds its dense product

    def with_stored_dense(self) -> "FactorizedHandler":
        """This handler for a copy lowered with ``premasked=True``: its leaf's state holds the
        dense product beside the factors (:meth:`store_dense`), a path each site weighs."""
        h = copy.copy(self)
        h.stored_dense, h.choices, h._hoisted = True, {}, set()
        return h

    def store_dense(self, factors):
        """The leaf's params for a ``stored_dense`` copy: the factors and their dense product
        ``(*stack, K, N)`` in the factors' dtype (what ``premask`` returns)."""
        factors, _ = split_stored(factors)
        dense = self.kind.to_dense(factors, self.layout.k, self.layout.n)
        return {**factors, STORED_DENSE: dense.astype(jax.tree.leaves(factors)[0].dtype)}

    def site_reason(self, site) -> str | None:
        return direct_site_reason(site, self.layout)

    def init(self, leaf, key):
        layout = self.layout
        name = f"{self.path}: {self.rule.describe()}"
        if self.rule.init == "project":
            factors = self.kind.project(layout.to_matrix(leaf), self.rule.nblocks, name=name)
        else:
            factors = self.kind.init(key, layout.k, layout.n, self.rule.nblocks, jnp.float32,
                                     stack_shape=layout.stack_shape, name=name)
        self._factor_ndim = jax.tree.leaves(factors)[0].ndim   # with every stack axis
        return jax.tree.map(lambda f: f.astype(leaf.dtype), factors), None

    def _stack_axes_left(self, ref: ParamRef) -> int:
        """How many of the leaf's stack axes the ref's factors still have (scans and
        per-layer indexing take them off)."""
        removed = self._factor_ndim - jax.tree.leaves(split_stored(ref.state)[0])[0].ndim
        return len(self.layout.stack_axes) - removed

    def make_input(self, item, mask) -> ParamRef:
        return ParamRef.for_leaf(self.path, None, len(self.layout.shape), state=item, handler=self)

    # -- computing ------------------------------------------------------------------

    def site_path(self, key) -> str:
        reason = self._reasons.get(key, "not a site found at init")
        if reason is not None:
            return f"dense fallback ({reason})"
        chosen = self.chosen_path(key)
        if self.stored_dense and chosen is None:
            return f"{self._einsum_label} or the stored dense product (path chosen when traced)"
        if chosen is not None and any(key[:len(b)] == b for b in self._hoisted):
            return f"dense rebuilt from the factors once before the scan, XLA dot; per layer: {chosen}"
        return chosen if chosen is not None else f"{self._einsum_label} (path chosen when traced)"

    @property
    def _einsum_label(self) -> str:
        return "Monarch einsums" if self.kind.flops_kind == "monarch" else "block-diagonal einsum"

    def _candidates(self, x_shape, factors, stored: bool = False):
        """Paths as functions of ``(x2, *factor leaves)``, the einsums first (the default);
        with ``stored``, of ``(x2, *factor leaves, stored dense matrix)``, the stored product's
        dot a candidate too."""
        if stored:
            inner = self._candidates(x_shape, factors)
            return [dataclasses.replace(c, fn=(lambda fn: lambda x, *f: fn(x, *f[:-1]))(c.fn))
                    for c in inner if c.name != "xla_dense"] + [path_choice.Candidate(
                        "stored_dense", lambda x, *f: jnp.matmul(x, f[-1].astype(x.dtype)),
                        describe="stored dense product (premask), XLA dot")]
        kind, k, n = self.kind, self.layout.k, self.layout.n
        treedef = jax.tree.structure(factors)
        unflat = lambda leaves: jax.tree.unflatten(treedef, leaves)
        candidates = [
            path_choice.Candidate("einsum", lambda x, *f: kind.einsum(x, unflat(f), n),
                                  describe=self._einsum_label)]
        if kind.flops_kind == "monarch":
            candidates.append(_other_permutation(x_shape, factors, n, unflat))
            candidates.append(path_choice.Candidate(
                "block_sparse", lambda x, *f: monarch_block_sparse.monarch_matmul_block_sparse(
                    x, unflat(f), n),
                block_sparse_monarch_unsupported(x_shape, factors),
                "Monarch as two block-sparse products (block-sparse kernel)"))
        if kind.kernel is not None:
            fused, why_not = kind.kernel
            candidates.append(path_choice.Candidate(
                "fused_kernel", lambda x, *f: fused(x, unflat(f), n),
                why_not(x_shape, factors), "fused Monarch kernel"))
        # A stacked weight's sites run in a loop over layers, where a scan can rebuild the
        # dense matrices once for every layer (hoist_before_scan): timed alone, this path
        # pays its rebuild per call, so program tuning tries it whatever it measured.
        candidates.append(path_choice.Candidate(
            "xla_dense", lambda x, *f: jnp.matmul(x, kind.to_dense(unflat(f), k, n).astype(x.dtype)),
            describe="dense from factors, XLA dot", movable=bool(self.layout.stack_axes)))
        return candidates

    def _dense_fallback(self, key, ref: ParamRef) -> bool:
        """Whether the site at ``key`` computes the original eqn on the rebuilt dense weight
        (not a direct product, or a stack of factors no scan has sliced)."""
        return (self._reasons.get(key, "not a site found at init") is not None
                or bool(self._stack_axes_left(ref)))

    def on_site(self, interp, eqn, key, invals, scope):
        # A site computed here is not hoisted in this trace: the report follows the latest one
        # (a scan that hoists asks again after its first trace, hoist_before_scan).
        self._hoisted = {b for b in self._hoisted if key[:len(b)] != b}
        operand = 0 if isinstance(invals[0], ParamRef) else 1
        ref = invals[operand]
        if self._dense_fallback(key, ref):
            return bind_eqn(eqn, [materialize(x) for x in invals])
        x = invals[1 - operand]
        # The dtype the original dot multiplies in: Flax casts float32 params to the compute
        # dtype (bf16) before the dot, a cast the ref absorbed as a view op. The factors are
        # cast alike, so every path (einsums, fused kernel, dense rebuild) does the dense
        # program's bf16 work; promoting bf16 activations with float32 factors would run
        # each site as float32 GEMMs instead (and rule the fused kernel out).
        dtype = jnp.result_type(*(v.aval.dtype for v in eqn.invars[:2]))
        factors, stored = split_stored(ref.state)
        factors = jax.tree.map(lambda f: f.astype(dtype), factors)
        k, n = self.layout.k, self.layout.n
        leaves = jax.tree.leaves(factors)
        flops = 2.0 * (math.prod(x.shape) // k) * sum(f.size for f in leaves)
        if stored is not None:
            # cast at the dot, as the dense program casts its weight (Flax's compute dtype)
            leaves = leaves + [stored]
        m = math.prod(x.shape) // k
        specs = [jax.ShapeDtypeStruct((m, k), dtype),
                 *(jax.ShapeDtypeStruct(f.shape, f.dtype) for f in leaves)]
        signature = (f"{self.kind.flops_kind},M={m},K={k},N={n},nblocks={self.rule.nblocks},"
                     f"dtype={jnp.dtype(dtype).name}" + (",stored_dense" if stored is not None else ""))
        candidates = self._candidates((m, k), factors, stored=stored is not None)
        # The factored product's work (each factor entry once per token): at prefill and
        # training sizes the site is compute-bound and is timed over two input sets. The
        # baseline is the dense program's dot on its stored weight, not ``xla_dense`` (which
        # rebuilds the matrix from the factors every call, and differentiated also runs the
        # rebuild's backward): a site is faster than dense only if it beats that dot.
        choice = self._choose(key, "factorized_matmul", signature, candidates, specs,
                              flops=flops,
                              reference=DENSE_WEIGHT,
                              reference_specs=[specs[0], jax.ShapeDtypeStruct((k, n), dtype)])
        fn = next(c.fn for c in candidates if c.name == choice.name)
        return matmul_at_site(eqn, operand, x, lambda x2: fn(x2, *leaves))

    def may_hoist_before_scan(self) -> bool:
        """Whether a site's choice can be anything but the deterministic first candidate (the
        einsums) here; if not, no scan needs its body traced twice to ask. A leaf with its
        stored dense product never rebuilds it."""
        return not self.stored_dense and path_choice.choices_can_vary()

    def hoist_before_scan(self, ref: ParamRef, body_key) -> bool:
        """Whether a scan should take this stacked weight dense, rebuilt from the factors once
        for every layer before it: where each of the weight's sites in the body (at
        ``body_key``) chose ``xla_dense``, which rebuilds its layer's matrix inside the body.
        The same products then run as one batched computation outside the loop (and one for
        their backward), not as a few small kernels per layer, and the body's dots are the
        dense program's own."""
        mine = [c for k, c in getattr(self, "choices", {}).items()
                if k[:len(body_key)] == body_key and self._reasons.get(k) is None]
        if not mine or any(c.name != "xla_dense" for c in mine):
            return False
        self._hoisted.add(tuple(body_key))
        return True

    def materialize(self, ref: ParamRef):
        # The dense value in the view the factors are in now: stack axes a scan or an
        # index took off are gone, one a slice took a layer of has that size; the
        # pending view ops then apply as the program wrote them.
        factors, stored = split_stored(ref.state)
        layout, first = self.layout, jax.tree.leaves(factors)[0]
        left = self._stack_axes_left(ref)
        gone = layout.stack_axes[:len(layout.stack_axes) - left]
        shape = list(layout.shape)
        for a, size in zip(layout.stack_axes[len(gone):], first.shape[:left]):
            shape[a] = size
        keep = [a for a in range(len(shape)) if a not in gone]
        new = {a: i for i, a in enumerate(keep)}
        layout = WeightLayout(tuple(shape[a] for a in keep),
                              tuple(new[a] for a in self.layout.stack_axes[len(gone):]),
                              tuple(new[a] for a in layout.contract_axes),
                              tuple(new[a] for a in layout.free_axes))
        dense = stored if stored is not None else self.kind.to_dense(factors, self.layout.k,
                                                                     self.layout.n)
        return views.replay_pending(ref, layout.from_matrix(dense).astype(first.dtype))

    # -- report ---------------------------------------------------------------------

    def params_after(self, density):
        stack = math.prod(self.layout.stack_shape)
        stored = self.layout.k * self.layout.n if self.stored_dense else 0   # held beside them
        return stack * (self.kind.param_count(self.layout.k, self.layout.n, self.rule.nblocks)
                        + stored)

    def flops_after(self, site, density):
        k, n = self.layout.k, self.layout.n
        tokens = site.flops // (2 * k * n)
        return monarch.flops(tokens, k, n, self.rule.nblocks, kind=self.kind.flops_kind)

