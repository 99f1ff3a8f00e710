"""Calibration: run a program over data and collect statistics where it multiplies weights.

The observing twin of the rewriting interpreter. Every parameter leaf enters
the walk as a :class:`ParamRef` holding its current value; at each observed
weight site the activation that multiplies the weight is brought to its matrix
view ``X (rows, K)`` (the contracted dims last, in dimension-number order, the
order the weight's K axis flattens in) and an *observer* turns it into additive
statistics. The default observer gives :class:`SiteStats` — the Gram ``XᵀX``
in float32 (SparseGPT's Hessian), the per-input-channel sums and squared sums
(Wanda's ``‖X_j‖₂``, DSnoT's mean and variance) and the row count. Eqns named
in ``activations`` are observed on their output instead (activation-threshold
rules calibrate through the same walk), and eqns named in ``inputs`` (``{key: operand}``)
on one of their inputs (the activation entering a matmul, for thresholds on it).

Statistics are summed over batches (one jitted program per set of observed
keys, accumulated on the device) but not over loop iterations: a site inside
a scan returns one entry per iteration, stacked along a leading axis (per
layer for ``nn.scan`` stacks). Across devices: under ``jax.jit`` with batches sharded
on a mesh the sums are global (XLA reduces the partial sums); inside
``shard_map``/``pmap`` pass ``axis_name`` and they are ``psum``-ed.
Only the sites asked for are observed, so memory stays one group of sites'
``K²`` (times the layers of their scan) at a time.

Forward only: remat is evaluated inline, and a while loop or cond that holds an
observed eqn is refused (its per-iteration statistics have no static layout).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from sparsejax import paths as path_lib
from sparsejax.compiler.interpreter import Interpreter, Key, Scope, bind_eqn, sub_jaxprs
from sparsejax.compiler.param_ref import ParamRef, is_ref, materialize
from sparsejax.compiler.sites import WeightSite, find_weight_sites

Observer = Callable[[jax.Array], Any]


class SiteStats(NamedTuple):
    """Additive statistics of the activation ``X (rows, K)`` at one weight site.

    Leading axes (if any) index the iterations of the scans around the site.
    """

    gram: jax.Array     # (..., K, K) float32: XᵀX
    sum: jax.Array      # (..., K): Σ_rows X
    sqsum: jax.Array    # (..., K): Σ_rows X²  (= diag of gram)
    count: jax.Array    # (...,): rows seen (tokens)

    @property
    def mean(self) -> jax.Array:
        return self.sum / jnp.maximum(self.count, 1)[..., None]

    @property
    def var(self) -> jax.Array:
        return jnp.maximum(self.sqsum / jnp.maximum(self.count, 1)[..., None] - self.mean ** 2, 0.0)

    @property
    def norm(self) -> jax.Array:
        """‖X_j‖₂ per input channel (Wanda's activation norm)."""
        return jnp.sqrt(self.sqsum)

    def layer(self, index: tuple[int, ...]) -> "SiteStats":
        return SiteStats(*(x[index] for x in self))


def gram_stats(x2: jax.Array) -> SiteStats:
    """The default observer: float32 Gram, channel sums, squared sums, count."""
    x = x2.astype(jnp.float32)
    if x2.dtype in (jnp.bfloat16, jnp.float16):
        # A product of two 16-bit floats is exact in float32, so a 16-bit matmul that
        # accumulates in float32 is the float32 Gram of these values, at tensor-core speed
        # (a float32 HIGHEST matmul is several times slower on GPUs).
        gram = lax.dot_general(x2, x2, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    else:
        gram = lax.dot_general(x, x, (((0,), (0,)), ((), ())), precision=lax.Precision.HIGHEST)
    return SiteStats(gram, x.sum(0), (x * x).sum(0), jnp.asarray(x.shape[0], jnp.float32))


def activation_matrix(eqn, operand: int, x: jax.Array) -> jax.Array:
    """The activation of a dot_general site as ``(rows, K)`` (the weight's K order)."""
    (lc, rc), _ = eqn.params["dimension_numbers"]
    x_contract = lc if operand == 1 else rc
    x_free = [d for d in range(x.ndim) if d not in x_contract]
    x2 = jnp.transpose(x, (*x_free, *x_contract))
    return x2.reshape(-1, math.prod(x.shape[d] for d in x_contract))


# ----------------------------------------------------------------------------- the walk


class _ObservingInterpreter(Interpreter):
    """Computes the original program and emits observer outputs for chosen eqn keys.

    Observed values leave scans stacked per iteration through the interpreter's sink
    (:meth:`Interpreter.emit`), the same way a rewriting pass hands values out.
    """

    def __init__(self, sites: dict[Key, Observer], activations: dict[Key, Observer],
                 axis_name: str | None, inputs: dict[Key, tuple[int, Observer]] | None = None):
        inputs = inputs or {}
        super().__init__(self._on_site, {k: self._hook(k, f) for k, f in activations.items()},
                         input_hooks={k: self._input_hook(k, j, f) for k, (j, f) in inputs.items()})
        self.site_observers, self.axis_name = sites, axis_name
        self._observed_prefixes = {k[:i] for k in [*sites, *activations, *inputs]
                                   for i in range(1, len(k))}

    def _emit(self, key, stats):
        if self.axis_name is not None:
            stats = lax.psum(stats, self.axis_name)
        self.emit(key, stats)

    def _on_site(self, interp, eqn, key, invals, scope):
        out = bind_eqn(eqn, [materialize(x) for x in invals])
        observer = self.site_observers.get(key)
        if observer is not None:
            operand = 0 if is_ref(invals[0]) else 1
            self._emit(key, observer(activation_matrix(eqn, operand, materialize(invals[1 - operand]))))
        return out

    def _hook(self, key, observer):
        def hook(eqn, outvals):
            self._emit(key, observer(outvals[0]))
            return outvals
        return hook

    def _input_hook(self, key, operand, observer):
        def hook(eqn, invals, state):
            x = materialize(invals[operand])
            self._emit(key, observer(x) if state is None else observer(x, state))
            return invals
        return hook

    def _eval_eqn(self, eqn, key: Key, invals: list, scope: Scope) -> list:
        name = eqn.primitive.name
        if key in self._observed_prefixes:
            if name == "scan":
                return self._scan(eqn, key, invals, scope)
            if name in ("checkpoint", "remat2", "remat"):   # forward only: no need to remat
                jaxpr, consts = _open(eqn.params["jaxpr"])
                return self.run(jaxpr, consts, invals, key + ("jaxpr",), scope)
            if name in ("while", "cond"):
                raise ValueError(f"calibration: eqn {'/'.join(map(str, key))} is a {name} holding "
                                 "an observed site; statistics are collected in straight-line code "
                                 "and scans only (use lax.scan / fori_loop with a static trip count)")
        return super()._eval_eqn(eqn, key, invals, scope)


def _open(closed):
    if hasattr(closed, "consts") and hasattr(closed, "jaxpr"):
        return closed.jaxpr, closed.consts
    return closed, ()


def eqn_at(jaxpr, key: Key):
    """The eqn a key names (see :mod:`sparsejax.compiler.interpreter`)."""
    eqn = jaxpr.eqns[key[0]]
    rest = key[1:]
    while rest:
        name, index = rest[0], rest[1]
        jaxpr = dict(sub_jaxprs(eqn))[name]
        eqn = jaxpr.eqns[index]
        rest = rest[2:]
    return eqn


# ----------------------------------------------------------------------------- the program


@dataclasses.dataclass
class Calibration:
    """A traced function ready to be observed: ``fn(params, *args)`` and its weight sites.

    Build it with :func:`trace`; :meth:`collect` runs it over batches.
    """

    fn: Callable
    treedef: Any
    paths: list[str]
    arg_treedef: Any
    arg_avals: list[Any]
    closed: Any
    sites: list[WeightSite]
    _programs: dict = dataclasses.field(default_factory=dict)

    def site_input(self, site: WeightSite):
        """The jaxpr var of the activation a site multiplies (sites sharing it share stats)."""
        eqn = eqn_at(self.closed.jaxpr, site.key)
        return eqn.invars[1 - site.operand]

    def check_args(self, args: tuple, where: str) -> list:
        leaves, treedef = jax.tree_util.tree_flatten(args)
        avals = [(tuple(jnp.shape(x)), jnp.result_type(x)) for x in leaves]
        if treedef != self.arg_treedef or avals != self.arg_avals:
            raise ValueError(f"{where}: shapes {[a[0] for a in avals]} (dtypes "
                             f"{[str(a[1]) for a in avals]}) differ from the example batch's "
                             f"{[a[0] for a in self.arg_avals]}: give every calibration batch the "
                             "same shapes (pad or drop the last one)")
        return leaves

    def program(self, site_keys: Sequence[Key] = (), activation_keys: Sequence[Key] = (),
                observer: Observer = gram_stats, axis_name: str | None = None,
                input_keys: Sequence[tuple[Key, int]] = ()) -> Callable:
        """``(param leaves, arg leaves) -> (outputs, {key: stats})``, un-jitted.

        ``input_keys``: ``(key, operand)`` pairs whose input ``operand`` is observed; the
        program's optional third argument ``{key: state}`` is then passed to the observer
        as ``observer(x, state)`` (sliced per iteration inside scans: per-layer state).
        """
        sites = {k: observer for k in site_keys}
        acts = {k: observer for k in activation_keys}
        inputs = {k: (j, observer) for k, j in input_keys}
        closed, paths = self.closed, self.paths

        def run(param_leaves, arg_leaves, input_state=None):
            interp = _ObservingInterpreter(sites, acts, axis_name, inputs)
            interp.hook_state = dict(input_state or {})
            refs = [ParamRef.for_leaf(p, x, jnp.ndim(x)) for p, x in zip(paths, param_leaves)]
            outs = interp.run(closed.jaxpr, closed.consts, [*refs, *arg_leaves])
            return outs, interp.sink

        return run

    def collect(self, params: Any, batches: Iterable[tuple], site_keys: Sequence[Key] = (),
                activation_keys: Sequence[Key] = (), observer: Observer = gram_stats,
                input_keys: Sequence[tuple[Key, int]] = (), input_state: dict | None = None,
                ) -> dict[Key, Any]:
        """Statistics at the given keys, summed over ``batches`` (each a tuple of fn's args).

        ``input_keys``/``input_state``: see :meth:`program`.
        """
        cache_key = (tuple(site_keys), tuple(activation_keys), observer, tuple(input_keys))
        compiled = self._programs.get(cache_key)
        if compiled is None:
            program = self.program(site_keys, activation_keys, observer, input_keys=input_keys)

            def stats_of(param_leaves, arg_leaves, state):
                return program(param_leaves, arg_leaves, state)[1]

            def add(acc, param_leaves, arg_leaves, state):
                return jax.tree.map(jnp.add, acc, stats_of(param_leaves, arg_leaves, state))

            compiled = self._programs[cache_key] = (jax.jit(add, donate_argnums=0),
                                                    jax.jit(stats_of))
        accumulate, first = compiled
        param_leaves = jax.tree_util.tree_leaves(params)
        acc = None
        for i, args in enumerate(batches):
            arg_leaves = self.check_args(as_args(args), f"calibration batch {i}")
            state = dict(input_state or {})
            acc = (first(param_leaves, arg_leaves, state) if acc is None
                   else accumulate(acc, param_leaves, arg_leaves, state))
        if acc is None:
            raise ValueError("calibration: no batches were given")
        return acc

    def outputs(self, params: Any, args: tuple) -> Any:
        """``fn(params, *args)`` through the traced program (no observers)."""
        outs, _ = self.program()(jax.tree_util.tree_leaves(params),
                                 self.check_args(as_args(args), "batch"))
        return outs


def as_args(batch) -> tuple:
    """A calibration batch as the argument tuple after params (a lone array is ``(array,)``)."""
    return batch if isinstance(batch, tuple) else (batch,)


def trace(fn: Callable, params: Any, *example_args: Any) -> Calibration:
    """Traces ``fn(params, *example_args)`` and finds its weight sites."""
    with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [path_lib.path_str(kp) for kp, _ in with_path]
    leaves = [x for _, x in with_path]
    arg_leaves, arg_treedef = jax.tree_util.tree_flatten(example_args)
    n = len(leaves)

    def flat_fn(*flat):
        p = jax.tree_util.tree_unflatten(treedef, flat[:n])
        args = jax.tree_util.tree_unflatten(arg_treedef, flat[n:])
        return jax.tree_util.tree_leaves(fn(p, *args))

    structs = [jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)) for x in [*leaves, *arg_leaves]]
    try:
        closed = jax.make_jaxpr(flat_fn)(*structs)
    except (TypeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"calibration: fn(params, *batch) fails on the example batch of shapes "
                         f"{[tuple(jnp.shape(x)) for x in arg_leaves]}: {first}") from None
    sites = find_weight_sites(closed, paths, n)[0]
    arg_avals = [(tuple(jnp.shape(x)), jnp.result_type(x)) for x in arg_leaves]
    return Calibration(fn, treedef, paths, arg_treedef, arg_avals, closed, sites)


def calibrate(fn: Callable, params: Any, batches: Sequence[Any],
              paths: Sequence[str] | None = None) -> dict[str, SiteStats]:
    """:class:`SiteStats` of every weight site (or those of ``paths``), in one pass.

    Keys are ``"path"``, or ``"path@key"`` for a leaf with several sites.
    """
    batches = list(batches)
    if not batches:
        raise ValueError("calibrate: no batches were given")
    cal = trace(fn, params, *as_args(batches[0]))
    sites = [s for s in cal.sites if s.primitive == "dot_general" and
             (paths is None or s.path in paths)]
    stats = cal.collect(params, batches, [s.key for s in sites])
    count = {}
    for s in sites:
        count[s.path] = count.get(s.path, 0) + 1
    return {(s.path if count[s.path] == 1 else f"{s.path}@{'/'.join(map(str, s.key))}"):
            stats[s.key] for s in sites}
