"""The :class:`~sparsejax.report.Report` of a sparsified program: one row per ruled weight
(its density, parameter and FLOP counts, and how its sites compute), the weights no rule
touched, the tracer's notes, and one row per activation site or threshold point.

Built from what the compiler already holds (slots, handlers, the activation plan, the
threshold points and what calibration and ``measure_activations`` measured), so the public
object only gathers its state and calls :func:`build_report`.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

from sparsejax.report import ActivationRow, Report, ReportRow

__all__ = ["build_report", "activation_rows", "compute_column"]


def compute_column(handler) -> str:
    """How a handler's sites compute (each site's path, deduplicated), for the report."""
    return ", ".join(sorted({handler.site_path(s.key) for s in handler.sites}))


def activation_rows(plan, measured: Sequence[dict], thresholds, threshold_info: dict
                    ) -> list[ActivationRow]:
    """Rows for the activation sites of ``plan`` (``[(site, rule)]``, with the densities
    ``measure_activations`` recorded in ``measured``) and for the threshold points
    (``[(point, rule)]``, with calibration's ``threshold_info``)."""
    rows = []
    for site, rule in plan:
        mine = [r for r in measured if r["key"] == site.key]
        mean = lambda k: (sum(r[k] for r in mine) / len(mine)) if mine else None
        rows.append(ActivationRow(
            kind=site.kind, where=site.scope.describe() + " eqn " + "/".join(map(str, site.key)),
            paths=site.paths, shape=site.shape, rule=rule.describe() if rule else None,
            target=(rule.kept_per_row(site.width) / site.width)
            if hasattr(rule, "kept_per_row") else None,
            measured_before=mean("before"), measured_after=mean("after")))
    for point, rule in thresholds:
        info = threshold_info.get(point.name)
        kept = lambda key: None if info is None else 1.0 - float(np.mean(info[key]))
        rows.append(ActivationRow(
            kind=f"threshold ({point.kind})",
            where=point.scope.describe() + " eqn " + "/".join(map(str, point.key)),
            paths=point.paths, shape=point.shape, rule=rule.describe(),
            target=kept("target") if info else 1.0 - float(rule.sparsity),
            measured_before=None, measured_after=kept("measured")))
    return rows


def build_report(slots, handlers: dict, slot_masks, notes: dict, activations) -> Report:
    """The report for ``slots`` with their ``handlers`` and masks (``None`` for factorized
    or unruled leaves); ``notes``: the trace's ``{eqn key: note}``; ``activations``: the
    :func:`activation_rows`."""
    rows, untouched, unruled_paths = [], [], []
    for slot, m in zip(slots, slot_masks):
        if slot.rule is None:
            untouched.append((slot.path, slot.shape, bool(slot.sites)))
            if slot.path in handlers:     # a lowered copy's activation-sparse or GEMV site
                unruled_paths.append((slot.path, compute_column(handlers[slot.path])))
            continue
        handler = handlers[slot.path]
        size = int(np.prod(slot.shape))
        if m is not None:
            density = float(jnp.mean(jnp.asarray(m, jnp.float32)))
            params_after = handler.params_after(density)
        else:   # factors: density is their size relative to the dense weight
            params_after = handler.params_after(1.0)
            density = params_after / size
        rows.append(ReportRow(
            path=slot.path, rule=slot.rule.describe(), shape=slot.shape,
            layout=slot.layout.describe() if slot.layout else "unstructured",
            sites=len(slot.sites), density=density,
            params_before=size, params_after=params_after,
            flops_before=sum(s.flops for s in slot.sites),
            flops_after=sum(handler.flops_after(s, density) for s in slot.sites),
            kernel=compute_column(handler)))
    notes = [f"{'/'.join(map(str, k))}: {v}" for k, v in notes.items()]
    return Report(rows, untouched, notes, activations, unruled_paths)
