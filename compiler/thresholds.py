"""Activation thresholds: where they apply, and how they are calibrated from data.

A *threshold point* is one input of one eqn whose entries with ``|x| <= t`` are set to
zero: the activation entering a linear layer (TEAL, CHESS in attention) or the FFN's
``act(gate)`` where it meets the up branch (CATS, CHESS). :func:`threshold_plan` finds the
points a recipe's :class:`~sparsejax.rules.ActivationThreshold` rules select;
:func:`calibrate` sets their thresholds to a target sparsity from calibration batches.

Calibration uses the observing walk of :mod:`sparsejax.compiler.calibration` (one
mechanism for every statistic of the data at sites): each point's input is observed as
a histogram of ``|x|`` over fixed log-spaced bins (additive over batches, per layer of a
scanned stack), with squared sums per bin so that the energy a threshold removes is known
too (the cost the greedy allocation across layers minimizes). CHESS points are observed
twice: first the mean ``|up|`` per channel, then the histogram of ``|act| · E|up|``.
"""

from __future__ import annotations

import dataclasses
import heapq
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import paths as path_lib
from sparsejax.compiler import calibration
from sparsejax.compiler.activation_sites import ActivationSite, down_projection_sites
from sparsejax.compiler.interpreter import Key, Scope
from sparsejax.rules import CHESS, TEAL, ActivationThreshold

__all__ = ["ThresholdPoint", "threshold_plan", "calibrate", "HISTOGRAM_EDGES"]

# |x| histogram bins: 0 (and anything below 1e-8) in bin 0, then 1536 log-spaced bins up to
# 1e4 (about 1.8% wide each), the rest in the last bin.
HISTOGRAM_EDGES = np.concatenate([[0.0], np.logspace(-8, 4, 1537)]).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class ThresholdPoint:
    """An eqn input thresholded by a rule.

    Attributes:
      name: its key in ``sstate["thresholds"]``.
      kind: "input" (a linear layer's input) or "ffn" (act(gate) of an FFN).
      key, operand: the eqn and which of its inputs.
      shape: the input's shape (thresholds act along its last axis).
      scope: the loops around it; each scan adds a leading axis to its thresholds.
      paths: the weight it feeds (input) or the FFN's weights (ffn).
      flops: FLOPs per call of the matmuls that read the thresholded value.
      channelwise_key: (CHESS) the eqn input holding the up branch the channels are
        weighted by: ``(key, operand)``, else None.
    """

    name: str
    kind: str
    key: Key
    operand: int
    shape: tuple[int, ...]
    scope: Scope
    paths: tuple[str, ...]
    flops: int
    channelwise_key: tuple[Key, int] | None = None

    @property
    def layers(self) -> tuple[int, ...]:
        """Leading axes of the thresholds: one per scan around the point."""
        return tuple(n for kind, n in self.scope.loops if kind == "scan")

    @property
    def width(self) -> int:
        return self.shape[-1]

    def state_shape(self) -> tuple[int, ...]:
        return (*self.layers, self.width if self.channelwise_key else 1)

    def describe(self) -> str:
        return f"{self.kind} threshold at {'/'.join(map(str, self.key))}#{self.operand} {list(self.paths)}"


def _name(kind: str, path: str, taken: set) -> str:
    base = f"{kind}__" + path.replace("/", "__")    # orbax-friendly: no '/' in keys
    name, i = base, 1
    while name in taken:
        i += 1
        name = f"{base}__{i}"
    taken.add(name)
    return name


def _selects_weight(pattern, path: str, roles) -> bool:
    if isinstance(pattern, path_lib.MatmulWeights):
        return pattern.selects(path, roles.get(path, frozenset()))
    return path_lib.matches(pattern, path)


def threshold_plan(recipe, traced) -> list[tuple[ThresholdPoint, ActivationThreshold]]:
    """Every threshold point of the recipe's threshold rules (first rule wins per point)."""
    rules = [r for r in recipe if isinstance(r, ActivationThreshold)]
    if not rules:
        return []
    taken: set = set()
    chosen: dict[tuple[Key, int], tuple[ThresholdPoint, ActivationThreshold]] = {}
    flops_at = {}
    for s in traced.sites:
        flops_at[s.key] = flops_at.get(s.key, 0) + s.flops
    ffn_sites = [a for a in traced.activation_sites if a.kind == "ffn" and a.act_key is not None]
    sites_by_path: dict[str, list] = {}
    for s in traced.sites:
        sites_by_path.setdefault(s.path, []).append(s)

    def input_point(r, site):
        if site.primitive != "dot_general":
            return
        where = (site.key, 1 - site.operand)
        if where in chosen:
            return
        chosen[where] = (ThresholdPoint(_name("input", site.path, taken), "input", site.key,
                                        1 - site.operand, tuple(site.other_shape), site.scope,
                                        (site.path,), site.flops), r)

    def ffn_point(r, a: ActivationSite):
        where = (a.act_key, a.act_operand)
        if where in chosen:
            return
        down = down_projection_sites(a, sites_by_path)
        flops = sum(s.flops for s in down) // max(len(down), 1) if down else 0
        channel = None
        if isinstance(r, CHESS):
            if down and a.act_key[-1] == down[0].key[-1]:
                raise ValueError(f"{r.describe()}: the FFN at {a.describe()} has no up branch; "
                                 "channel-wise thresholds weigh act(gate) by the up branch "
                                 "(use TEAL or CATS for a non-gated FFN)")
            channel = (a.act_key, 1 - a.act_operand)
        chosen[where] = (ThresholdPoint(_name("ffn", a.paths[-1], taken), "ffn", a.act_key,
                                        a.act_operand, tuple(a.shape), a.scope, a.paths, flops,
                                        channel), r)

    for r in rules:
        before = len(chosen)
        if isinstance(r, TEAL):
            for s in traced.sites:
                if _selects_weight(r.pattern, s.path, traced.roles):
                    input_point(r, s)
        else:
            for a in ffn_sites:
                if any(path_lib.matches(r.pattern, p) for p in a.paths) or r.pattern == "*":
                    ffn_point(r, a)
            if isinstance(r, CHESS) and r.attention is not None:
                ffn_paths = {p for a in ffn_sites for p in a.paths}
                for s in traced.sites:
                    if s.path not in ffn_paths and path_lib.matches(r.attention, s.path):
                        input_point(r, s)
        if len(chosen) == before:
            what = "linear layer input" if isinstance(r, TEAL) else "gated FFN activation"
            found = [a.describe() for a in ffn_sites] or "none"
            raise ValueError(f"{r.describe()}: selects no {what} (FFN sites found: {found}; "
                             f"weights: {sorted(sites_by_path)[:8]}); change its pattern")
    return list(chosen.values())


# ----------------------------------------------------------------------------- statistics


class Histogram(NamedTuple):
    """Additive |x| histogram of one point (leading axes: layers)."""

    count: jax.Array    # (..., bins)
    energy: jax.Array   # (..., bins): Σ x² of the entries in each bin


def histogram_observer(x: jax.Array, scale: jax.Array | None = None) -> Histogram:
    """|x| (times a per-channel ``scale``, CHESS) binned on :data:`HISTOGRAM_EDGES`."""
    a = jnp.abs(x.astype(jnp.float32))
    if scale is not None:
        a = a * scale.astype(jnp.float32)
    a = a.reshape(-1)
    edges = jnp.asarray(HISTOGRAM_EDGES)
    b = jnp.clip(jnp.searchsorted(edges, a, side="right") - 1, 0, len(HISTOGRAM_EDGES) - 1)
    count = jnp.zeros(len(HISTOGRAM_EDGES), jnp.float32).at[b].add(1.0)
    energy = jnp.zeros(len(HISTOGRAM_EDGES), jnp.float32).at[b].add(a * a)
    return Histogram(count, energy)


def channel_abs_observer(x: jax.Array):
    """(Σ_rows |x| per channel, rows): E|up_i| for CHESS."""
    a = jnp.abs(x.astype(jnp.float32)).reshape(-1, x.shape[-1])
    return a.sum(0), jnp.asarray(a.shape[0], jnp.float32)


def quantile(count: np.ndarray, q: float) -> float:
    """The |x| below which a fraction ``q`` of the histogram lies (log-interpolated in a bin)."""
    total = count.sum()
    if total <= 0 or q <= 0:
        return 0.0
    cum = np.cumsum(count) / total
    b = int(np.searchsorted(cum, q, side="left"))
    if b == 0:
        return 0.0          # the zeros alone reach the target: drop exactly those
    b = min(b, len(count) - 1)
    lo, hi = HISTOGRAM_EDGES[b], (HISTOGRAM_EDGES[b + 1] if b + 1 < len(HISTOGRAM_EDGES)
                                  else HISTOGRAM_EDGES[b] * 1.02)
    below = cum[b - 1]
    frac = 0.0 if cum[b] <= below else (q - below) / (cum[b] - below)
    lo = max(lo, 1e-8)
    return float(np.exp(np.log(lo) + frac * (np.log(hi) - np.log(lo))))


def energy_removed(h_count: np.ndarray, h_energy: np.ndarray, q: float) -> float:
    """Fraction of Σx² in the entries a threshold at sparsity ``q`` drops (bin-interpolated)."""
    total = h_count.sum()
    if total <= 0 or h_energy.sum() <= 0:
        return 0.0
    cum = np.cumsum(h_count) / total
    ecum = np.concatenate([[0.0], np.cumsum(h_energy)]) / h_energy.sum()
    b = int(np.searchsorted(cum, q, side="left"))
    if b >= len(h_count):
        return 1.0
    below = cum[b - 1] if b else 0.0
    frac = 0.0 if cum[b] <= below else (q - below) / (cum[b] - below)
    return float(ecum[b] + frac * (ecum[b + 1] - ecum[b]))


def greedy_allocation(histograms: list[Histogram], weights: list[float], target: float,
                      step: float = 0.025, cap: float = 0.95) -> list[np.ndarray]:
    """TEAL's greedy allocation under a global target, on a proxy cost.

    Every (point, layer) starts at sparsity 0; one step at a time, the one whose next
    ``step`` removes the least energy (Σx² of the dropped entries over Σx² of the input)
    per unit of its weight (FLOPs) is raised, until the FLOP-weighted mean sparsity
    reaches ``target``. Returns per point its per-layer sparsities.
    """
    units = []
    for p, h in enumerate(histograms):
        c, e = np.asarray(h.count), np.asarray(h.energy)
        flat_c, flat_e = c.reshape(-1, c.shape[-1]), e.reshape(-1, e.shape[-1])
        for layer in range(flat_c.shape[0]):
            units.append((p, layer, flat_c[layer], flat_e[layer], weights[p] / flat_c.shape[0]))
    level = np.zeros(len(units))
    total_w = sum(u[4] for u in units) or 1.0
    cost = lambda i: (energy_removed(units[i][2], units[i][3], min(level[i] + step, cap))
                      - energy_removed(units[i][2], units[i][3], level[i])) / max(units[i][4], 1e-12)
    is_open = lambda i: level[i] + step <= cap + 1e-9
    # A unit's next-step cost depends on its own level only: a heap keeps every open unit's
    # (cost, index), and only the unit just raised is scored again (ties: lowest index).
    heap = [(cost(i), i) for i in range(len(units)) if is_open(i)]
    heapq.heapify(heap)
    weighted = 0.0
    while weighted / total_w < target - 1e-9 and heap:
        _, i = heapq.heappop(heap)
        new = min(level[i] + step, cap)
        weighted += (new - level[i]) * units[i][4]
        level[i] = new
        if is_open(i):
            heapq.heappush(heap, (cost(i), i))
    out, k = [], 0
    for h in histograms:
        n = int(np.prod(np.asarray(h.count).shape[:-1]))
        out.append(level[k:k + n].reshape(np.asarray(h.count).shape[:-1]))
        k += n
    return out


def calibrate(cal: calibration.Calibration, params: Any, batches: Sequence[tuple],
              plan: Sequence[tuple[ThresholdPoint, ActivationThreshold]],
              global_sparsity: float | None = None) -> tuple[dict, dict]:
    """Thresholds for every point of ``plan`` from ``batches``.

    Returns ``(thresholds, info)``: ``thresholds[name]`` shaped ``point.state_shape()``
    (per channel for CHESS FFN points), and ``info[name]`` with the target sparsity per
    layer (``target``); :func:`measure` counts the sparsity the thresholds give on the
    calibration data exactly, in a second pass (``SparseFunction.calibrate`` stores it as
    ``measured``).
    """
    if global_sparsity is not None and not 0.0 <= float(global_sparsity) < 1.0:
        raise ValueError(f"calibrate: global_sparsity must be in [0, 1), got {global_sparsity!r}")
    channel_points = [(p.channelwise_key, p) for p, _ in plan if p.channelwise_key]
    scales = {}
    if channel_points:
        stats = cal.collect(params, batches, input_keys=[k for k, _ in channel_points],
                            observer=channel_abs_observer)
        for (k, p) in channel_points:
            total, rows = stats[k[0]]
            scales[p.key] = jnp.asarray(total) / jnp.maximum(jnp.asarray(rows), 1.0)[..., None]
    keys = [(p.key, p.operand) for p, _ in plan]
    hists = cal.collect(params, batches, input_keys=keys, observer=histogram_observer,
                        input_state=scales)
    histograms = [Histogram(*[np.asarray(x) for x in hists[p.key]]) for p, _ in plan]
    if global_sparsity is not None:
        levels = greedy_allocation(histograms, [p.flops for p, _ in plan], float(global_sparsity))
    else:
        levels = [np.full(p.layers, float(r.sparsity)) for p, r in plan]
    thresholds, info = {}, {}
    for (p, r), h, level in zip(plan, histograms, levels):
        counts = h.count.reshape(-1, h.count.shape[-1])
        flat_level = np.asarray(level).reshape(-1)
        t = np.array([quantile(c, q) for c, q in zip(counts, flat_level)], np.float32)
        t = t.reshape(*p.layers, 1)
        if p.channelwise_key:      # |act_i| * s_i <= t  <=>  |act_i| <= t / s_i
            s = np.asarray(scales[p.key]).reshape(*p.layers, p.width)
            t = np.where(s > 0, t / np.maximum(s, 1e-30), np.float32(np.inf)).astype(np.float32)
        thresholds[p.name] = jnp.asarray(t)
        info[p.name] = {"target": np.asarray(level, np.float64).reshape(p.layers)}
    return thresholds, info


def sparsity_observer(x: jax.Array, threshold: jax.Array):
    """(entries at or below the threshold, entries): the sparsity a threshold gives."""
    dropped = jnp.abs(x) <= threshold.astype(x.dtype)
    return jnp.sum(dropped, dtype=jnp.float32), jnp.asarray(dropped.size, jnp.float32)


def measure(cal: calibration.Calibration, params: Any, batches: Sequence[tuple],
            plan, thresholds: dict) -> dict[str, np.ndarray]:
    """The sparsity each point's thresholds give on ``batches``, per layer."""
    keys = [(p.key, p.operand) for p, _ in plan]
    stats = cal.collect(params, batches, input_keys=keys, observer=sparsity_observer,
                        input_state={p.key: thresholds[p.name] for p, _ in plan})
    return {p.name: np.asarray(stats[p.key][0]) / np.maximum(np.asarray(stats[p.key][1]), 1)
            for p, _ in plan}
