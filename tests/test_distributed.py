"""train.py across processes (jax.distributed over CPU gloo), the outer loop in train.py, and
the ways a multi-process start fails: unreachable coordinator, lone process 0, mismatched flags."""

import json
import os
import pathlib
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest

import train
from sparsejax.training import checkpointing
from sparsejax.distributed import launch

ROOT = pathlib.Path(__file__).resolve().parents[1]

TINY = dict(d_model=32, n_layers=1, n_heads=2, d_ff=64, seq_len=32, batch_size=8, steps=8,
            learning_rate=1e-2, warmup_steps=2, log_every=1, eval_every=8, eval_batches=2,
            checkpoint_every=4, recipe="dense")
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _losses(workdir, split="train"):
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if r["split"] == split}


def _train_on_processes(workdir, n=2) -> list[str]:
    command = [sys.executable, str(ROOT / "train.py"), *[f"--{k}={v}" for k, v in TINY.items()],
               "--mesh=data:-1", f"--workdir={workdir}"]
    status, outputs = launch.launch(command, n, devices_per_process=1, env=ENV, capture=True,
                                    timeout_s=500)
    assert status == 0, "\n".join(o[-3000:] for o in outputs)
    return outputs


def test_two_processes_follow_the_one_process_curve(tmp_path):
    one = train.train_and_evaluate(train.Config(**TINY, mesh="data:1", workdir=str(tmp_path / "one")))
    reference = {h["step"]: h["loss"] for h in one["history"]}

    _train_on_processes(tmp_path / "two")
    two = _losses(tmp_path / "two")
    assert sorted(two) == sorted(reference) == list(range(1, 9))
    np.testing.assert_allclose([two[s] for s in sorted(two)], [reference[s] for s in sorted(two)],
                               rtol=1e-4)
    np.testing.assert_allclose(_losses(tmp_path / "two", "eval")[8], one["eval"]["loss"], rtol=1e-4)
    # Written once: one summary, one set of checkpoints (steps 4 and 8).
    assert (tmp_path / "two" / "summary.txt").read_text().count("eval_loss") == 1
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir() if p.name.isdigit()) == ["4", "8"]

    # The checkpoint the two processes wrote is whole (restore checks each array's fingerprint)
    # and holds the state the one-process run ended with.
    with checkpointing.Checkpointer(tmp_path / "two" / "checkpoints") as ckpt:
        restored = ckpt.restore(one["state"], step=8)
    assert restored.step == 8 and restored.data_position == 8
    chex.assert_trees_all_close(jax.device_get(restored.state.params),
                                jax.device_get(one["state"].params), rtol=1e-4, atol=1e-5)


def _python(code: str, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], env={**ENV, "JAX_PLATFORMS": "cpu", **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


JOIN = """
import time
from sparsejax.distributed import runtime
start = time.monotonic()
try:
    runtime.initialize({address!r}, 2, {pid}, timeout_s=3)
except runtime.DistributedError as e:
    print("ERROR", e, "after", round(time.monotonic() - start, 1))
"""


def test_a_process_that_cannot_join_fails_clearly_within_the_timeout():
    address = f"localhost:{launch.free_port()}"
    worker = _python(JOIN.format(address=address, pid=1))   # nobody listens at the address
    lone_coordinator = _python(JOIN.format(address=f"localhost:{launch.free_port()}", pid=0))
    out1, _ = worker.communicate(timeout=120)
    out0, _ = lone_coordinator.communicate(timeout=120)
    line = [l for l in out1.splitlines() if l.startswith("ERROR")][0]
    assert f"cannot reach the coordinator at {address}" in line
    assert float(line.split("after")[-1]) < 3 + 2
    # Process 0 serves the coordinator itself; when the others never come, the watchdog ends
    # it with one line (XLA would abort with a stack trace when its deadline passes).
    assert lone_coordinator.returncode == 2, out0[-2000:]
    assert "process 0 of 2 could not join the run" in out0 and "Check failure" not in out0


def test_processes_started_with_different_flags_are_refused():
    code = ("import os\nfrom sparsejax.distributed import runtime\nruntime.initialize(timeout_s=60)\n"
            "pid = int(os.environ['JAX_PROCESS_ID'])\n"
            "try:\n    runtime.check_same_settings({'steps': 3, 'learning_rate': 0.1 * (pid + 1)}, name='flags')\n"
            "except runtime.DistributedError as e:\n    print('REFUSED', e)\n")
    status, outputs = launch.launch([sys.executable, "-c", code], 2, devices_per_process=1, env=ENV,
                                    capture=True, timeout_s=120)
    assert status == 0, outputs
    assert "REFUSED process 1 was started with other flags than process 0 (--learning_rate=0.2 here, " \
           "0.1 on process 0)" in outputs[1]
    assert "REFUSED processes [1] were started with other flags than process 0" in outputs[0]


# ----------------------------------------------------------------------------- the outer loop in train.py


def test_train_with_sparseloco_logs_measured_bytes_per_outer_step(tmp_path):
    cfg = train.Config(**{**TINY, "steps": 6, "eval_every": 6, "checkpoint_every": 6}, mesh="data:2",
                       outer="sparseloco", inner_steps=3, outer_chunk=256, outer_density=0.02,
                       workdir=str(tmp_path / "run"))
    result = train.train_and_evaluate(cfg)
    assert np.isfinite(result["eval"]["loss"])
    records = [json.loads(l) for l in (tmp_path / "run" / "outer_steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6]
    # Expected size from the shapes: per chunk of 256 (or a smaller leaf), k uint16 indices,
    # ceil(k / 4) code bytes and two float32 levels.
    expected = 0
    for leaf in jax.tree.leaves(result["state"].params):
        chunk, k = (256, 5) if leaf.size >= 256 else (leaf.size, max(1, min(leaf.size, round(5 * leaf.size / 256))))
        expected += -(-leaf.size // chunk) * (2 * k + -(-k // 4) + 8)
    assert records[0]["sent_bytes"] == expected
    assert records[0]["ddp_bytes"] == 3 * 4 * sum(x.size for x in jax.tree.leaves(result["state"].params))


@pytest.mark.parametrize("overrides,message", [
    (dict(outer="sparseloco", recipe="gmp90"), "masks are updated by the optimizer"),
    (dict(outer="diloco", mesh="data:2,fsdp:2"), "every device of the data axis is one replica"),
    (dict(outer="sparseloco", outer_density=2.0), "--outer=sparseloco: density=2.0 must be in"),
    (dict(outer="sparseloco", inner_steps=0), "inner_steps=0 must be at least 1"),
    (dict(outer="local"), "--outer 'local': use none, diloco or sparseloco"),
])
def test_bad_outer_flags_are_one_line_errors(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        train.prepare(train.Config(**{**TINY, "mesh": "data:2", **overrides}, workdir=str(tmp_path)))
