"""Benchmark scripts' CPU smoke runs: the scripts still run and write their sections."""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_e2e_speed_smoke_profile(tmp_path):
    """``e2e_speed.py --smoke --profile --tune``: one sparse recipe, one measure; the profile section
    (kernel time by category, the difference from dense, slowest kernels) reaches the .md and
    the JSON although the CPU has no device trace planes."""
    env = {**os.environ, "OUT": str(tmp_path),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "e2e_speed.py"), "--smoke", "--profile", "--tune",
         "--layouts=scan", "--recipes=monarch4", "--measure=prefill,decode1"],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    md = (tmp_path / "e2e_speed.md").read_text()
    assert "| scan | monarch4 | decode1 |" in md
    # --tune: on the CPU no site has measured times, so nothing is switched and the tuned row
    # is the program already timed
    assert "| scan | monarch4 | decode1 tuned |" in md and "no switch kept of 0 tried" in md
    assert "Device kernel time per step" in md and "Sparse minus dense" in md
    assert "Slowest 12 kernels" in md and "Failed variants" not in md
    # the Amdahl bound of a prefill/train measure, from dense's GEMM time
    assert "What the step allows (Amdahl)" in md and "| scan | monarch4 | prefill |" in md
    profiles = json.loads((tmp_path / "e2e_speed.json").read_text())["profiles"]
    assert {(p["recipe"], p["measure"]) for p in profiles} == {
        (r, m) for r in ("dense", "monarch4") for m in ("prefill", "decode1")}
    ceiling = next(p["ceiling"] for p in profiles if p["recipe"] == "monarch4" and p["measure"] == "prefill")
    assert ceiling["free"] >= ceiling["at_ideal"] >= 1.0 and ceiling["measured"] > 0
    profiles = [p for p in profiles if p["measure"] == "decode1"]
    dense, sparse = sorted(profiles, key=lambda p: p["recipe"] != "dense")
    assert dense["total_us"] > 0 and dense["launches"] > 0 and dense["top"]
    assert "error" not in sparse and sparse["vs_dense"]["total_us"] == sparse["total_us"] - dense["total_us"]
