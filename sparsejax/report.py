"""The report of a sparsified function: what was rewritten, and what was not."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ReportRow:
    path: str
    rule: str
    shape: tuple[int, ...]
    layout: str            # "stack × K×N" as the sites see the leaf
    sites: int             # matmuls/convs that use the leaf
    density: float
    params_before: int
    params_after: int
    flops_before: int      # per call, loops included
    flops_after: int
    kernel: str            # how the sites compute: "XLA", a kernel name, or a fallback reason


@dataclasses.dataclass(frozen=True)
class ActivationRow:
    kind: str                         # "ffn" or "attention"
    where: str                        # loops around the site and its eqn key
    paths: tuple[str, ...]            # weights around it (up/gate/down, or q/k projections)
    shape: tuple[int, ...]            # the value top-k runs over (last axis)
    rule: str | None                  # the rule that sparsifies it, if any
    target: float | None              # kept fraction the rule asks for
    measured_before: float | None     # from measure_activations: density without the rule
    measured_after: float | None      # ... and with it


def _si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


@dataclasses.dataclass(frozen=True)
class Report:
    rows: list[ReportRow]
    untouched: list[tuple[str, tuple[int, ...], bool]]   # (path, shape, is a weight site)
    notes: list[str]
    activations: list[ActivationRow] = dataclasses.field(default_factory=list)
    # (path, how its sites compute) of weights no rule claims that a lowered copy still
    # computes on a chosen path (beside a Spark FFN, under a threshold, or dense_gemv=True)
    unruled_paths: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    @property
    def params_before(self) -> int:
        return sum(r.params_before for r in self.rows)

    @property
    def params_after(self) -> int:
        return sum(r.params_after for r in self.rows)

    @property
    def flops_before(self) -> int:
        return sum(r.flops_before for r in self.rows)

    @property
    def flops_after(self) -> int:
        return sum(r.flops_after for r in self.rows)

    def to_dict(self) -> dict:
        return {"rows": [dataclasses.asdict(r) for r in self.rows],
                "untouched": [{"path": p, "shape": s, "weight_site": w} for p, s, w in self.untouched],
                "notes": list(self.notes),
                "activations": [dataclasses.asdict(a) for a in self.activations],
                "unruled_paths": [{"path": p, "compute": c} for p, c in self.unruled_paths]}

    def __str__(self) -> str:
        header = ("path", "rule", "shape", "layout", "sites", "density", "params", "FLOPs", "compute")
        body = [(r.path, r.rule, "×".join(map(str, r.shape)), r.layout, str(r.sites),
                 f"{r.density:.3f}", f"{_si(r.params_before)} → {_si(r.params_after)}",
                 f"{_si(r.flops_before)} → {_si(r.flops_after)}", r.kernel) for r in self.rows]
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = []
        if self.rows:
            lines += [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
            lines += [fmt.format(*row) for row in body]
            lines.append(f"total: params {_si(self.params_before)} → {_si(self.params_after)}, "
                     f"FLOPs {_si(self.flops_before)} → {_si(self.flops_after)} per call "
                         "(a mask's FLOPs after count kept weights only: XLA still multiplies "
                         "the zeros unless the site is lowered to a sparse kernel)")
        if self.untouched:
            weights = [p for p, _, w in self.untouched if w]
            others = [p for p, _, w in self.untouched if not w]
            if weights:
                lines.append(f"weights no rule touched ({len(weights)}): " + ", ".join(weights))
            if others:
                lines.append(f"other parameters ({len(others)}): " + ", ".join(others))
        if self.unruled_paths:
            lines.append(f"weights no rule touched, on a chosen path ({len(self.unruled_paths)}):")
            lines += [f"  {p}: {c}" for p, c in self.unruled_paths]
        if self.activations:
            lines.append("activation sites:")
            pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"
            for a in self.activations:
                weights = a.paths[-1] if a.kind == "ffn" and a.paths else ", ".join(a.paths) or "-"
                lines.append(f"  {a.kind:<9} {weights}  {'×'.join(map(str, a.shape))}  "
                             f"{a.rule or 'no rule'}  target {pct(a.target)}  "
                             f"measured {pct(a.measured_before)} → {pct(a.measured_after)}  ({a.where})")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def _repr_pretty_(self, printer, cycle):
        printer.text(str(self))
