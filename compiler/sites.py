"""Weight sites: which matmul or conv consumes which parameter leaf, and how.

:func:`find_weight_sites` walks a traced function with every parameter leaf
wrapped in a :class:`ParamRef`; each dot_general or conv_general_dilated that
receives a ref is a site. The site records the leaf's :class:`WeightLayout`
(read off the dimension numbers through the view ops in between), the loops
around it and its FLOPs per call. The walk also records the other ops that read
a leaf (a gather: an embedding table) and which of them stand between a leaf and
a matmul (``x @ (w + a @ b)``), so errors can name them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax

from sparsejax.compiler.interpreter import SITE_PRIMITIVES, Interpreter, Key, Scope, bind_eqn
from sparsejax.compiler.param_ref import ParamRef, is_ref, materialize
from sparsejax.layout import WeightLayout


@dataclasses.dataclass(frozen=True)
class WeightSite:
    """One matmul/conv that multiplies by a parameter leaf."""

    path: str
    key: Key
    primitive: str
    operand: int                      # which operand is the weight (0 or 1)
    layout: WeightLayout | None       # None: the leaf's axes mix K and N (unusual reshapes)
    flops: int                        # per call, loops included
    scope: Scope
    weight_shape: tuple[int, ...]     # the operand's shape at the site
    other_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    dimension_numbers: Any
    view_ops: tuple[str, ...] = ()    # view ops between the leaf and the site
    dtype: str = "float32"            # the operands' promoted dtype


def _site_dims(eqn, operand: int, ndim: int):
    """(contracted dims, free dims, batch dims) of the weight operand, or None."""
    if eqn.primitive.name == "dot_general":
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        contract, batch = (lc, lb) if operand == 0 else (rc, rb)
        free = [d for d in range(ndim) if d not in contract and d not in batch]
        return list(contract), free, list(batch)
    if operand != 1:  # conv inputs are activations, kernels are operand 1
        return None
    rhs_spec = eqn.params["dimension_numbers"].rhs_spec
    out_dim, in_dim, *spatial = rhs_spec
    # Spatial dims first, input features innermost: N:M groups then run over channels.
    return [*spatial, in_dim], [out_dim], []


def layout_at_site(eqn, ref: ParamRef, operand: int, leaf_shape: Sequence[int]) -> WeightLayout | None:
    """The leaf's axis roles as this site uses them."""
    dims = _site_dims(eqn, operand, len(ref.origins))
    if dims is None:
        return None
    contract_dims, free_dims, _ = dims

    def axes_of(site_dims):
        out: list[int] = []
        for d in site_dims:
            out.extend(a for a in ref.origins[d] if a not in out)
        return out

    contract, free = axes_of(contract_dims), axes_of(free_dims)
    if set(contract) & set(free) or not contract or not free:
        return None
    if eqn.primitive.name == "dot_general":
        # The matrix view follows the leaf's own storage order, whatever order the dot
        # lists its dims in: einsum("bqhe,hed->bqd") contracts (e, h), yet K = h·e with
        # e innermost, as Linen's DenseGeneral lays it out; N:M groups and blocks then
        # run along head_dim.
        contract, free = sorted(contract), sorted(free)
    stack = [a for a in range(len(leaf_shape)) if a not in contract and a not in free]
    # A stack axis must have been indexed away, or be a dot batch dim; a leaf axis that
    # was broadcast into contracted and free dims at once cannot be laid out as a matrix.
    try:
        return WeightLayout(tuple(leaf_shape), tuple(stack), tuple(contract), tuple(free))
    except ValueError:
        return None


def contracts(eqn, operand: int) -> bool:
    """Whether the eqn reduces over some axis of this operand: an einsum with no contracted
    axis (penzai's norm scale, ``'...d,d->...d'``) is an elementwise product, not a matmul."""
    if eqn.primitive.name != "dot_general":
        return True
    (lc, rc), _ = eqn.params["dimension_numbers"]
    return bool(lc if operand == 0 else rc)


def site_flops(eqn, operand: int) -> int:
    out_size = math.prod(eqn.outvars[0].aval.shape)
    w_shape = eqn.invars[operand].aval.shape
    if eqn.primitive.name == "dot_general":
        (lc, rc), _ = eqn.params["dimension_numbers"]
        contract = lc if operand == 0 else rc
        k = math.prod(w_shape[d] for d in contract)
    else:
        out_dim = eqn.params["dimension_numbers"].rhs_spec[0]
        k = math.prod(w_shape) // w_shape[out_dim]
    return 2 * out_size * k


@dataclasses.dataclass
class WeightUses:
    """Uses of parameter leaves other than views and weight sites.

    Attributes:
      reads: path -> names of the ops that read the leaf (materializing it).
      through: path -> names of such ops whose result reaches a matmul or conv in
        the same body: what stands between the weight and its matmul.
    """

    reads: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    through: dict[str, list[str]] = dataclasses.field(default_factory=dict)


def _add(table: dict[str, list[str]], path: str, op: str) -> None:
    ops = table.setdefault(path, [])
    if op not in ops:
        ops.append(op)


class SiteRecorder:
    """The analysis pass: records every weight site, computes the original eqn."""

    def __init__(self, leaf_shapes: dict[str, tuple[int, ...]]):
        self.leaf_shapes = leaf_shapes
        self.sites: list[WeightSite] = []
        self.uses = WeightUses()
        self._derived: dict[int, frozenset] = {}   # id(value) -> {(path, first op)}
        self._alive: list = []                       # keeps those ids unique

    def _sources(self, eqn, invals: list) -> frozenset | None:
        """The (path, first op) pairs a result computed from parameters alone comes from.

        None when an operand depends on the activations (``x + bias`` is not a weight
        any more); literals and constants are parameters' company, not activations.
        """
        sources = set()
        for x in invals:
            if is_ref(x):
                sources.add((x.path, eqn.primitive.name))
            elif id(x) in self._derived:
                sources |= self._derived[id(x)]
            elif isinstance(x, jax.core.Tracer):
                return None
        return frozenset(sources)

    def _derive(self, outvals: list, sources: frozenset | None) -> None:
        if sources:
            for y in outvals:
                self._derived[id(y)] = sources
                self._alive.append(y)

    def _note_through(self, invals: list) -> None:
        """A matmul operand computed from parameters alone: name the ops on the way."""
        for x in invals[:2]:
            for path, op in sorted(self._derived.get(id(x), ())):
                _add(self.uses.through, path, op)

    def observe(self, eqn, key: Key, invals: list, outvals: list) -> None:
        """Follows values computed from materialized leaves to the matmuls they reach."""
        for x in invals:
            if is_ref(x):
                _add(self.uses.reads, x.path, eqn.primitive.name)
        if eqn.primitive.name in SITE_PRIMITIVES:
            self._note_through(invals)
        self._derive(outvals, self._sources(eqn, invals))

    def __call__(self, interp: Interpreter, eqn, key: Key, invals: list, scope: Scope) -> list:
        self._note_through(invals)
        for operand, x in enumerate(invals[:2]):
            if not is_ref(x) or not contracts(eqn, operand):
                continue
            other = invals[1 - operand]
            self.sites.append(WeightSite(
                path=x.path, key=key, primitive=eqn.primitive.name, operand=operand,
                layout=layout_at_site(eqn, x, operand, self.leaf_shapes[x.path]),
                flops=site_flops(eqn, operand) * scope.trips, scope=scope,
                weight_shape=tuple(eqn.invars[operand].aval.shape),
                other_shape=tuple(jax.numpy.shape(materialize(other))),
                out_shape=tuple(eqn.outvars[0].aval.shape),
                dimension_numbers=eqn.params["dimension_numbers"], view_ops=x.ops,
                dtype=str(jax.numpy.result_type(*(v.aval.dtype for v in eqn.invars[:2])))))
        outvals = bind_eqn(eqn, [materialize(x) for x in invals])
        self._derive(outvals, self._sources(eqn, invals))    # a LoRA product ``a @ b``
        return outvals


def find_weight_sites(closed_jaxpr, leaf_paths: Sequence[str], n_params: int):
    """Weight sites of a traced function whose first ``n_params`` inputs are parameter leaves.

    Returns (sites, interpreter notes, :class:`WeightUses`).
    """
    jaxpr = closed_jaxpr.jaxpr
    shapes = {p: tuple(v.aval.shape) for p, v in zip(leaf_paths, jaxpr.invars[:n_params])}
    recorder = SiteRecorder(shapes)
    interp = Interpreter(recorder, observe=recorder.observe)

    def walk(*args):
        refs = [ParamRef.for_leaf(p, a, a.ndim) for p, a in zip(leaf_paths, args[:n_params])]
        return interp.run(jaxpr, closed_jaxpr.consts, [*refs, *args[n_params:]])

    jax.make_jaxpr(walk)(*[jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in jaxpr.invars])
    return recorder.sites, interp.notes, recorder.uses
