"""What a training run shows and writes: a progress line, metric files, a plot.

* :class:`ProgressLine`: one line, rewritten in place on a terminal, with step,
  loss, tokens/s and current sparsity (any metrics you pass).
* :class:`MetricsWriter`: every metric to ``metrics.jsonl`` (one JSON object a
  line) and, where ``tensorboardX`` is installed, to TensorBoard event files.
  On resume it drops what a killed run logged after the checkpoint it resumes.
* :func:`plot_curves`: a PNG of loss and sparsity against step (matplotlib's
  Agg canvas, no display needed).
* :func:`format_summary`: the end-of-run summary text (per-layer sparsity from
  :func:`sparsejax.optim.masked_sparsity` with ``by_path=True``).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import sys
import time
import warnings
from typing import Any, Iterable, Mapping, TextIO

import jax
import numpy as np

__all__ = ["ProgressLine", "MetricsWriter", "read_metrics", "plot_curves", "format_summary",
           "METRICS_FILE"]

METRICS_FILE = "metrics.jsonl"


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _format_value(key: str, value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        if "sparsity" in key or "density" in key:
            return f"{value:.3f}"
        return f"{value:.4g}"
    return str(value)


class ProgressLine:
    """A one-line progress display: ``step 120/1000 [###.......] loss 2.31 | 9.8k tok/s | ...``.

    On a terminal the line is rewritten in place (``\\r``); elsewhere (a log
    file, CI) each update is its own line, so call ``update`` as often as lines
    are wanted.

    Args:
      total_steps: the run's last step (for the bar and the ETA).
      tokens_per_step: items one step consumes (global batch × sequence length);
        with it, each update reports tokens/s since the previous update.
      stream: where to write (default: stderr).
    """

    def __init__(self, total_steps: int, tokens_per_step: int | None = None, stream: TextIO | None = None,
                 width: int = 20):
        self.total_steps = int(total_steps)
        self.tokens_per_step = tokens_per_step
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self._last: tuple[int, float] | None = None
        self._live = False
        self.tokens_per_second: float | None = None

    def _is_tty(self) -> bool:
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())

    def format(self, step: int, metrics: Mapping[str, Any] | None = None) -> str:
        """The line for ``step``; updates the tokens/s estimate."""
        now = time.perf_counter()
        rate = None
        if self._last is not None and step > self._last[0] and now > self._last[1]:
            rate = (step - self._last[0]) / (now - self._last[1])
        self._last = (step, now)
        filled = int(self.width * min(step, self.total_steps) / max(self.total_steps, 1))
        parts = [f"step {step}/{self.total_steps} [{'#' * filled}{'.' * (self.width - filled)}]"]
        for key, value in (metrics or {}).items():
            parts.append(f"{key} {_format_value(key, value)}")
        if rate is not None:
            if self.tokens_per_step:
                self.tokens_per_second = rate * self.tokens_per_step
                parts.append(f"{_si(self.tokens_per_second)} tok/s")
            else:
                parts.append(f"{rate:.2f} step/s")
            parts.append(f"eta {_duration((self.total_steps - step) / rate)}")
        return " | ".join(parts)

    def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> str:
        line = self.format(step, metrics)
        if self._is_tty():
            self.stream.write("\r\x1b[2K" + line)
            self._live = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        return line

    def print(self, text: str) -> None:
        """Writes ``text`` on its own line without breaking the progress line."""
        self.close()
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._live:
            self.stream.write("\n")
            self.stream.flush()
            self._live = False


def _scalar(value: Any) -> Any:
    if isinstance(value, (jax.Array, np.ndarray, np.generic)):
        value = np.asarray(value)
        if value.size != 1:
            raise ValueError(f"metrics must be scalars, got an array of shape {value.shape}")
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)     # JSON has no NaN/inf; keep them visible as strings
    return value


class MetricsWriter:
    """Writes metrics to ``<logdir>/metrics.jsonl`` and TensorBoard event files.

    Args:
      logdir: directory for both (created if needed).
      tensorboard: ``None`` writes event files if ``tensorboardX`` is installed
        (warning once if it is not); ``True`` requires it; ``False`` skips them.
      resume_step: when resuming from a checkpoint at this step, records of later
        steps (written by the run that was killed) are dropped from the JSONL file
        and purged from TensorBoard, so the curves have no duplicates.
    """

    def __init__(self, logdir: str | os.PathLike, tensorboard: bool | None = None,
                 resume_step: int | None = None):
        self.logdir = pathlib.Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.path = self.logdir / METRICS_FILE
        self.is_writer = jax.process_index() == 0
        if resume_step is not None and self.is_writer and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", -1) <= resume_step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)
        self._file = open(self.path, "a", encoding="utf-8") if self.is_writer else None
        self._tb = None
        if tensorboard is not False and self.is_writer:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                message = ("tensorboardX is not installed, so no TensorBoard event files are written "
                           "(metrics still go to metrics.jsonl): pip install tensorboardX")
                if tensorboard:
                    raise ImportError(message) from None
                warnings.warn(message, RuntimeWarning, stacklevel=2)
            else:
                purge = None if resume_step is None else resume_step + 1
                self._tb = SummaryWriter(str(self.logdir / "tensorboard"), purge_step=purge)

    @property
    def tensorboard_enabled(self) -> bool:
        return self._tb is not None

    def write(self, step: int, metrics: Mapping[str, Any], split: str = "train") -> dict:
        """Logs ``metrics`` (name → scalar) for ``step``; TensorBoard tags are ``split/name``."""
        record = {"step": int(step), "split": split, "time": round(time.time(), 3)}
        record.update({k: _scalar(v) for k, v in metrics.items()})
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("step", "split", "time") and isinstance(value, (int, float)) \
                        and not isinstance(value, bool):
                    self._tb.add_scalar(f"{split}/{key}", value, global_step=int(step))
        return record

    def write_text(self, tag: str, text: str, step: int = 0) -> None:
        """Free text (e.g. the final summary) into TensorBoard's text tab."""
        if self._tb is not None:
            self._tb.add_text(tag, f"```\n{text}\n```", global_step=int(step))

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a ``metrics.jsonl`` file (a torn last line, from a kill, is skipped)."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def _series(records: Iterable[dict], split: str, key: str) -> tuple[list[int], list[float]]:
    points = {}
    for r in records:
        if r.get("split") == split and isinstance(r.get(key), (int, float)):
            points[r["step"]] = float(r[key])      # a later record of a step wins
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def plot_curves(records: Iterable[dict] | str | os.PathLike, png_path: str | os.PathLike,
                title: str | None = None, loss_key: str = "loss", sparsity_key: str = "sparsity") -> str:
    """Saves a PNG with loss (train and eval) and sparsity against step; returns its path.

    ``records`` are metric records (as :class:`MetricsWriter` writes them) or the
    path of a ``metrics.jsonl`` file.
    """
    if isinstance(records, (str, os.PathLike)):
        records = read_metrics(records)
    records = list(records)
    # The Agg canvas directly: no pyplot state, no display, whatever backend the user set.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_sparsity = fig.subplots(1, 2)
    for split, style in (("train", "-"), ("eval", "o-")):
        steps, values = _series(records, split, loss_key)
        if steps:
            ax_loss.plot(steps, values, style, label=f"{split} {loss_key}", markersize=3)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel(loss_key)
    ax_loss.set_title("loss")
    ax_loss.grid(alpha=0.3)
    if ax_loss.lines:
        ax_loss.legend()
    steps, values = _series(records, "train", sparsity_key)
    if steps:
        ax_sparsity.plot(steps, values, "-", color="tab:red")
    ax_sparsity.set_ylim(-0.02, 1.02)
    ax_sparsity.set_xlabel("step")
    ax_sparsity.set_ylabel("fraction of weights masked")
    ax_sparsity.set_title("sparsity")
    ax_sparsity.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    png_path = str(png_path)
    fig.savefig(png_path, format="png")
    return png_path


def format_summary(metrics: Mapping[str, Any], layer_sparsity: Mapping[str, float] | None = None,
                   report: Any | None = None) -> str:
    """End-of-run text: final metrics, per-layer sparsity, and ``report()`` (params, FLOPs)."""
    lines = ["== summary =="]
    lines += [f"{k}: {_format_value(k, _scalar(v))}" for k, v in metrics.items()]
    if layer_sparsity:
        width = max(len(p) for p in layer_sparsity)
        lines.append("sparsity by layer:")
        lines += [f"  {p:<{width}}  {s:.3f}" for p, s in layer_sparsity.items()]
    if report is not None:
        lines.append(str(report))
    return "\n".join(lines)
