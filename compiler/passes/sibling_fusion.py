"""Horizontal fusion of sibling lowered sites: q/k/v (or gate/up) as one block-sparse matmul.

At 10% density a ``(1024, 1024)`` block-sparse site keeps about 6 of 64 blocks, so
launch and pipeline fill, not FLOPs, set its time. Attention's q, k and v (and a gated
FFN's gate and up) are *siblings*: separate dot_generals of the same activation with
weights of the same K. One kernel over their weights concatenated along N behaves like
the wide FFN sites, which the kernel handles well.

:func:`find_groups` reads the groups off a traced program (``lower(..., fuse_siblings=
True)``): lowered block-sparse sites in the same jaxpr whose activation is the same
``Var``, read the same way (same contracted dims), with weights of the same K, dtype,
block and stacking, each eligible for the kernel. The concatenated block masks give the
group's tables, built once on the host (per layer, held as device arrays beside the
layer's own, for scanned stacks). When the rewrite reaches a group's first eqn,
:class:`SiblingFusion` gathers every member's kept blocks (their weights are read from
the interpreter's environment: the same leaf refs their own sites will read),
concatenates them, runs one kernel (its VJP gives ``dX`` and, through the
concatenation, each member's ``dW``), splits the product along N, returns the first
member's part and hands the others to their own eqns when the walk reaches them.

Never slower than dense: the fused kernel is weighed (``path_choice``) against the members
computed as they would be without fusion (each by its own measured path) and against
XLA's dense product of the concatenated (masked) weights, all on the same arguments.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from sparsejax.compiler.interpreter import Key, sub_jaxprs
from sparsejax.compiler import views
from sparsejax.compiler.param_ref import is_ref
from sparsejax.compiler.passes.base import (DIRECT_VIEWS, PathChoosing, activation_plan,
                                            site_matrix_input, site_output)
from sparsejax.compiler.passes.lowering import OP, BlockSparseHandler
from sparsejax.compiler.passes.rewrite import rewrite_site
from sparsejax.kernels import block_sparse
from sparsejax.kernels import path_choice

__all__ = ["FusedTables", "Member", "SiblingGroup", "SiblingFusion", "find_groups", "mark_fusable"]

FUSED_OP = "block_sparse_matmul_siblings"


@dataclasses.dataclass(frozen=True)
class FusedTables:
    """The block tables of siblings' weights concatenated along N.

    Member ``i``'s columns are ``offsets[i] : offsets[i] + widths[i]`` of the fused
    ``(K, N)`` matrix (each member padded to whole blocks). The fused packed order
    (by column, then row) is the members' packed orders one after another, so for one
    matrix the fused blocks are the members' blocks concatenated. For stacked layers
    (per-layer tables padded to a capacity) ``src`` says, per layer, which slot of the
    members' concatenated slots each fused slot takes (fused slots past the layer's real
    blocks are padding and are zeroed).
    """

    tables: Any                       # BlockTables (one matrix) or TableBounds (stacked)
    offsets: tuple[int, ...]
    widths: tuple[int, ...]
    index: Any = None                 # numpy BlockIndex (*stack, ...) for stacked layers
    src: Any = None                   # numpy (*stack, capacity) int32

    @classmethod
    def of(cls, handlers: Sequence[BlockSparseHandler]) -> "FusedTables":
        first = handlers[0]
        (k, _), (bk, bn) = first.tables.shape, first.tables.block
        widths = tuple(h.tables.shape[1] for h in handlers)
        padded = [h.tables.grid[1] * bn for h in handlers]
        offsets = tuple(int(o) for o in np.cumsum([0, *padded[:-1]]))
        shape = (k, sum(padded))
        masks = np.concatenate([h.block_masks for h in handlers], axis=-1)   # (layers, kb, nb)
        if not first.stacked:
            return cls(block_sparse.tables_of(masks[0], shape, (bk, bn)), offsets, widths)
        bounds, index = block_sparse.stacked_tables(list(masks), shape, (bk, bn))
        starts = np.cumsum([0, *[h.tables.capacity for h in handlers[:-1]]])
        counts = np.stack([h.block_masks.sum(axis=(1, 2)) for h in handlers], axis=1)  # (layers, n)
        src = np.zeros((masks.shape[0], bounds.capacity), np.int32)
        for layer, row in enumerate(counts):
            taken = np.concatenate([s + np.arange(c) for s, c in zip(starts, row)]).astype(np.int32)
            src[layer, :len(taken)] = taken
        stack = first.layout.stack_shape
        index = block_sparse.BlockIndex(*(a.reshape(*stack, *a.shape[1:]) for a in index))
        return cls(bounds, offsets, widths, index, src.reshape(*stack, -1))

    @property
    def stacked(self) -> bool:
        return self.index is not None

    def device_state(self) -> dict:
        """The per-layer tables as the arrays a scan slices (see ``Interpreter.hook_state``)."""
        return {"index": block_sparse.BlockIndex(*(jnp.asarray(a) for a in self.index)),
                "src": jnp.asarray(self.src)}

    def first_layer(self) -> dict | None:
        if not self.stacked:
            return None
        nstack = self.src.ndim - 1
        one = lambda a: jnp.asarray(np.asarray(a).reshape(-1, *a.shape[nstack:])[0])
        return {"index": block_sparse.BlockIndex(*map(one, self.index)), "src": one(self.src)}

    def combine(self, blocks: Sequence[jax.Array], layer: dict | None) -> block_sparse.BlockSparseWeight:
        """The fused weight from each member's kept blocks (one layer's, for stacked tables)."""
        cat = jnp.concatenate(blocks, axis=0) if len(blocks) > 1 else blocks[0]
        if layer is None:
            return block_sparse.BlockSparseWeight(cat, self.tables)
        index, src = layer["index"], layer["src"]
        valid = jnp.arange(self.tables.capacity) < index.col_ptr[-1]
        fused = jnp.where(valid[:, None, None], cat[src], jnp.zeros((), cat.dtype))
        return block_sparse.BlockSparseWeight(fused, self.tables, index)

    def split(self, y: jax.Array) -> list[jax.Array]:
        return [y[..., o:o + w] for o, w in zip(self.offsets, self.widths)]


@dataclasses.dataclass(frozen=True)
class Member:
    """One site of a group: its eqn, and where its weight is when the group's first eqn runs."""

    key: Key
    eqn: Any
    operand: int                 # which operand is the weight
    handler: BlockSparseHandler
    weight_var: Any              # the Var (defined before the first eqn) holding its weight ref
    views: tuple = ()            # the view eqns from weight_var to the site (Flax's cast)

    def weight_ref(self, interp):
        """The member's weight ref as its own eqn will see it, read before that eqn runs."""
        ref = interp.value_of(self.weight_var)
        for e in self.views:
            others = [interp.value_of(v) for v in e.invars[1:]]
            if not is_ref(ref) or any(o is None for o in others):
                return None
            ref = views.apply_view(e, ref, others)
        return ref


class SiblingGroup(PathChoosing):
    """Sibling sites computed as one block-sparse matmul (see the module docstring)."""

    def __init__(self, members: Sequence[Member], fused: FusedTables):
        self.members, self.fused = tuple(members), fused
        self.state_key = members[0].key + ("siblings",)
        self.choices = {}

    @property
    def paths(self) -> list[str]:
        return [m.handler.path for m in self.members]

    def _weights(self, interp, invals) -> list | None:
        """Each member's kept blocks in this layer (or None: some member cannot be fused here)."""
        first = self.members[0]
        out = []
        for m in self.members:
            ref = invals[m.operand] if m is first else m.weight_ref(interp)
            if (not is_ref(ref) or ref.handler is not m.handler or ref.state is None
                    or ref.state.blocks.ndim != 3 or m.handler._reasons.get(m.key) is not None):
                return None
            out.append(ref)
        return out

    def compute(self, interp, eqn, invals) -> dict | None:
        """``{member key: outvals}`` of every member, or None where the group falls back per site."""
        first = self.members[0]
        refs = self._weights(interp, invals) if sum(is_ref(x) for x in invals[:2]) == 1 else None
        layer = None
        if self.fused.stacked:
            layer = interp.hook_state.get(self.state_key)
            if layer is None or layer["src"].ndim != 1:
                refs = None
        if refs is None:   # each member on its own path, and the report says so
            for mem in self.members:
                mem.handler.siblings.pop(mem.key, None)
            return None
        x = invals[1 - first.operand]
        dtype = jnp.result_type(*(v.aval.dtype for v in eqn.invars[:2]))
        k = first.handler.tables.shape[0]
        m = math.prod(x.shape) // k
        work = sum(2.0 * m * k * mem.handler.tables.shape[1] * mem.handler._density
                   for mem in self.members)         # the fused kernel's (see copies_for)
        choice = self._choose(first.key, FUSED_OP, self._signature(m, dtype),
                              self._candidates(m, dtype), self._specs(m, dtype),
                              check=not first.handler.premasked, flops=work)
        for mem in self.members:
            others = [p for p in self.paths if p != mem.handler.path]
            mem.handler.siblings[mem.key] = (others, choice)
        if choice.name == "separate":
            return None
        x2 = site_matrix_input(eqn, first.operand, x)
        if choice.name == "xla_dense":
            ws = [_matrix(mem, ref.materialize()) for mem, ref in zip(self.members, refs)]
            parts = self.fused.split(jnp.matmul(x2.astype(dtype), jnp.concatenate(
                [w.astype(dtype) for w in ws], axis=1)))
        else:
            weight = self.fused.combine([r.state.blocks.astype(dtype) for r in refs], layer)
            h = first.handler
            y = block_sparse.block_sparse_matmul(x2, weight, backend=h.backend, interpret=h.interpret)
            parts = self.fused.split(y)
        return {mem.key: site_output(mem.eqn, mem.operand, x2, y)
                for mem, y in zip(self.members, parts)}

    # -- path choice --------------------------------------------------------------

    def _signature(self, m: int, dtype) -> str:
        return "|".join(mem.handler._signature(m, dtype) for mem in self.members)

    def _specs(self, m: int, dtype) -> list:
        k = self.members[0].handler.tables.shape[0]
        return [jax.ShapeDtypeStruct((m, k), dtype),
                *(jax.ShapeDtypeStruct((k, mem.handler.tables.shape[1]), dtype)
                  for mem in self.members)]

    def _candidates(self, m: int, dtype) -> list:
        """The group's paths as functions of ``(x2, w_1, ..., w_n)`` (dense ``(K, N_i)``
        weights), each returning the members' products: the fused kernel, the members as
        each computes alone (its own chosen path), XLA's product of the concatenated weights."""
        handlers = [mem.handler for mem in self.members]
        first = handlers[0]
        k, n_total = self.fused.tables.shape
        why = block_sparse.supported((k, n_total), dtype, self.fused.tables.block,
                                     backend=first.backend, interpret=first.interpret)
        fused, layer = self.fused, self.fused.first_layer()
        backend, interpret = first.backend, first.interpret

        def fused_kernel(x, *ws):
            blocks = [h.first_layer_weight(w).blocks for h, w in zip(handlers, ws)]
            return fused.split(block_sparse.block_sparse_matmul(
                x, fused.combine(blocks, layer), backend=backend, interpret=interpret))

        alone = []
        for mem in self.members:      # each member's own choice (measured, cached) and its path
            h = mem.handler
            spec = [jax.ShapeDtypeStruct((m, h.tables.shape[0]), dtype),
                    jax.ShapeDtypeStruct(h.tables.shape, dtype)]
            own = h._choose(mem.key, OP, h._signature(m, dtype), h._candidates(dtype, m), spec,
                            check=not h.premasked,
                            flops=2.0 * m * h.tables.shape[0] * h.tables.shape[1] * h._density)
            alone.append(next(c.fn for c in h._candidates(dtype, m) if c.name == own.name))

        def separate(x, *ws):
            return [fn(x, w) for fn, w in zip(alone, ws)]

        masks = [None if h.premasked else jnp.asarray(h.mask_matrix(0)) for h in handlers]

        def xla_dense(x, *ws):
            cat = jnp.concatenate([w if mk is None else w * mk for w, mk in zip(ws, masks)], axis=1)
            y = jnp.matmul(x, cat)
            return [y[:, o:o + w.shape[1]] for o, w in
                    zip(np.cumsum([0, *[w.shape[1] for w in ws[:-1]]]), ws)]

        kernel_name = block_sparse.describe(backend, interpret) if why is None else why
        return [
            path_choice.Candidate(
                "fused_kernel", fused_kernel, why,
                f"one block-sparse kernel over the concatenated {k}×{n_total} weights ({kernel_name})"),
            path_choice.Candidate("separate", separate,
                                  describe="each sibling on its own path"),
            path_choice.Candidate(
                "xla_dense", xla_dense,
                describe="XLA dense matmul of the concatenated "
                         + ("pre-masked" if first.premasked else "masked") + " weights"),
        ]


def _matrix(mem: Member, w):
    """A member's weight at its site as the ``(K, N)`` matrix its plan multiplies by."""
    (lc, rc), _ = mem.eqn.params["dimension_numbers"]
    w_contract = lc if mem.operand == 0 else rc
    w_free = [d for d in range(w.ndim) if d not in w_contract]
    w2 = jnp.transpose(w, (*sorted(w_contract), *w_free))
    k = math.prod(w.shape[d] for d in w_contract)
    return w2.reshape(k, -1)


class SiblingFusion:
    """The groups of one traced program, as the rewrite's site function (see the module doc).

    ``on_site`` computes a group's members together when the walk reaches the first one, and
    returns the stashed product when it reaches each of the others; every other site goes to
    its handler (:func:`~sparsejax.compiler.passes.rewrite.rewrite_site`).
    """

    def __init__(self, groups: Sequence[SiblingGroup]):
        self.groups = list(groups)
        self._first = {g.members[0].key: g for g in self.groups}
        self._stash: dict = {}

    def initial_state(self) -> dict:
        """Per-layer tables of stacked groups, keyed for ``Interpreter.hook_state`` (scans slice them)."""
        return {g.state_key: g.fused.device_state() for g in self.groups if g.fused.stacked}

    def on_site(self, interp, eqn, key, invals, scope):
        if key in self._stash:
            return self._stash.pop(key)
        group = self._first.get(key)
        if group is not None:
            outs = group.compute(interp, eqn, invals)
            if outs is not None:
                self._stash.update((k, v) for k, v in outs.items() if k != key)
                return outs[key]
        return rewrite_site(interp, eqn, key, invals, scope)


def _body_at(jaxpr, prefix: Key):
    """The jaxpr whose eqns the keys ``prefix + (i,)`` name."""
    rest = prefix
    while rest:
        eqn = jaxpr.eqns[rest[0]]
        jaxpr = dict(sub_jaxprs(eqn))[rest[1]]
        rest = rest[2:]
    return jaxpr


def _weight_source(body, eqn_index: int, var, before: int):
    """``(Var, view eqns)``: the Var holding a site's weight ref before eqn ``before`` and the
    view ops from it to the site (Flax casts each kernel just before its dot), or None."""
    producers = {v: (i, e) for i, e in enumerate(body.eqns[:eqn_index]) for v in e.outvars}
    chain = []
    while var in producers and producers[var][0] >= before:
        _, e = producers[var]
        if e.primitive.name not in DIRECT_VIEWS or not e.invars:
            return None
        chain.append(e)
        var = e.invars[0]
    return None if isinstance(var, jex_core.Literal) else (var, tuple(reversed(chain)))


def find_groups(handlers: dict, traced, excluded: frozenset = frozenset(),
                tables_cache: dict | None = None) -> list[SiblingGroup]:
    """The sibling groups of ``traced`` (see the module docstring).

    ``handlers``: path -> handler (only :class:`BlockSparseHandler` sites group);
    ``excluded``: eqn keys that must stay alone (an input hook rewrites their activation);
    ``tables_cache``: member paths -> :class:`FusedTables`, shared across traces.
    """
    jaxpr = traced.closed.jaxpr
    buckets: dict = {}
    for site in traced.sites:
        h = handlers.get(site.path)
        if (not isinstance(h, BlockSparseHandler) or h.tables is None or site.key in excluded
                or site.primitive != "dot_general" or h.site_reason(site) is not None):
            continue
        if h.stacked and [n for kind, n in site.scope.loops if kind == "scan"] != list(
                h.layout.stack_shape):
            continue     # the group's per-layer tables travel through the same scans as the weights
        body = _body_at(jaxpr, site.key[:-1])
        eqn = body.eqns[site.key[-1]]
        x_var = eqn.invars[1 - site.operand]
        if isinstance(x_var, jex_core.Literal):
            continue
        bucket = (site.key[:-1], x_var, activation_plan(eqn, site.operand), h.tables.shape[0],
                  h.tables.block, h.layout.stack_shape, h.stacked, site.dtype, h.premasked,
                  h.packed, h.backend, h.interpret)
        buckets.setdefault(bucket, []).append((site, h, body, eqn))
    groups = []
    for found in buckets.values():
        found.sort(key=lambda f: f[0].key[-1])
        first_index = found[0][0].key[-1]
        members, seen = [], set()
        for site, h, body, eqn in found:
            if site.path in seen:
                continue
            source = ((eqn.invars[site.operand], ()) if not members else
                      _weight_source(body, site.key[-1], eqn.invars[site.operand], first_index))
            if source is None:
                continue     # its weight is computed after the first sibling: it stays alone
            seen.add(site.path)
            members.append(Member(site.key, eqn, site.operand, h, *source))
        if len(members) < 2:
            continue
        paths = tuple(m.handler.path for m in members)
        cache = tables_cache if tables_cache is not None else {}
        if paths not in cache:
            cache[paths] = FusedTables.of([m.handler for m in members])
        groups.append(SiblingGroup(members, cache[paths]))
    return groups


def mark_fusable(groups: Sequence[SiblingGroup]) -> None:
    """Tells each member's handler (for the report) which siblings it may be fused with."""
    for g in groups:
        for m in g.members:
            if m.key not in m.handler.siblings:
                m.handler.siblings[m.key] = ([p for p in g.paths if p != m.handler.path], None)
