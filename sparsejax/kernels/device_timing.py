"""How long the device works on a call, read from the profiler: where wall time measures dispatch.

A decode site's kernels read a few MB: an H200 finishes a 10 MB GEMV in about 3 µs, while the
host takes 5-15 µs to enqueue it. Timed by the wall clock, such a site measures the host's
dispatch however many copies of it one call runs (each copy is another launch to enqueue), and
two candidates a few µs apart come out in either order from run to run. In the decode step itself
the device is the bottleneck (on the H200 the profile of a 4-layer decode step put 330 µs of
kernels in 360 µs of wall time), so what a site costs there is its device time: the sum of its
kernels' durations, plus a small gap per launch.

:func:`device_seconds` traces a few calls under ``jax.profiler`` and sums the device's kernel
events (on a GPU, the ``Stream`` lines of the ``/device:GPU`` planes; on the CPU, XLA's ops on
the host's threads, which is what lets tests run it). The profiler is part of jaxlib: nothing
else is needed. It returns ``None`` where no trace can be taken (another trace is running) or
the trace holds no kernel events, and the caller keeps its wall-clock timing.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import os
import tempfile
from typing import Any, Callable

import jax

__all__ = ["DeviceTime", "LAUNCH_GAP_S", "device_seconds", "kernel_events", "profile_calls"]


# Device time between two back-to-back kernels on one stream, charged per launch: on the H200 a
# device-bound decode step's wall time exceeded its kernels' sum by 24-32 µs over 72 launches
# (benchmarks/results/decode_profile.md, session 11), about 0.4 µs each.
LAUNCH_GAP_S = 0.4e-6


@dataclasses.dataclass(frozen=True)
class DeviceTime:
    """One call's device time: ``kernel_s`` summed over its kernels, ``launches`` of them, and
    ``seconds`` = kernels plus :data:`LAUNCH_GAP_S` per launch."""

    kernel_s: float
    launches: float

    @property
    def seconds(self) -> float:
        return self.kernel_s + LAUNCH_GAP_S * self.launches


def _stat(event, key: str) -> str:
    for k, v in event.stats:
        if k == key:
            return str(v)
    return ""


def profile_calls(run: Callable[[], Any], calls: int, warmup: int = 1):
    """``jax.profiler``'s record of ``calls`` back-to-back calls of ``run()`` (no arguments;
    returns what to wait on) after ``warmup`` untraced ones, as a ``ProfileData``; ``None``
    where no trace could be taken (another one is running: this keeps out of its way) or
    none was written."""
    for _ in range(warmup):
        jax.block_until_ready(run())
    with tempfile.TemporaryDirectory() as d:
        try:
            jax.profiler.start_trace(d)
        except Exception:
            return None
        try:
            for _ in range(calls):
                out = run()
            jax.block_until_ready(out)
        finally:
            jax.profiler.stop_trace()
        files = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
        if not files:
            return None
        return jax.profiler.ProfileData.from_file(max(files, key=os.path.getmtime))


def kernel_events(data) -> dict[tuple[str, str], list[float]]:
    """``[total µs, launches]`` per (kernel, hlo op) in a profile (:func:`profile_calls`): the
    GPU streams' events, else (no GPU plane: CPU) the XLA ops on the host's threads. Empty for
    ``None``."""
    if data is None:
        return {}
    totals: dict[tuple[str, str], list[float]] = collections.defaultdict(lambda: [0.0, 0])
    device = [p for p in data.planes if p.name.startswith("/device:GPU")]
    if device:
        for plane in device:
            for line in plane.lines:
                if not line.name.startswith("Stream"):   # derived lines repeat the same time
                    continue
                for e in line.events:
                    t = totals[(e.name, _stat(e, "hlo_op"))]
                    t[0] += e.duration_ns / 1e3
                    t[1] += 1
        return dict(totals)
    for plane in data.planes:                 # CPU: XLA ops on the host's threads
        for line in plane.lines:
            for e in line.events:
                op = _stat(e, "hlo_op")
                # A loop's or call's event spans its body's ops, which have events of their own.
                if op and not op.startswith(("while", "conditional", "call")):
                    t = totals[(e.name, op)]
                    t[0] += e.duration_ns / 1e3
                    t[1] += 1
    return dict(totals)


def device_seconds(fn, *args, calls: int = 10, warmup: int = 1) -> DeviceTime | None:
    """The device time of one call of ``fn(*args)``, from ``calls`` calls traced by the profiler
    after ``warmup`` untraced ones; ``None`` where no trace could be taken or it holds no kernel
    events (the caller's wall-clock timing stands)."""
    events = kernel_events(profile_calls(lambda: fn(*args), calls, warmup))
    if not events:
        return None
    total_us = sum(us for us, _ in events.values())
    launches = sum(n for _, n in events.values())
    if not total_us > 0:
        return None
    return DeviceTime(kernel_s=total_us * 1e-6 / calls, launches=launches / calls)
