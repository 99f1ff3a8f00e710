"""train.py end to end at tiny sizes: every preset learns, runs resume exactly, bad input is refused."""

import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train
from sparsejax.training import presets

ROOT = pathlib.Path(__file__).resolve().parents[1]

TINY = dict(d_model=32, n_layers=1, n_heads=2, d_ff=64, seq_len=32, batch_size=8, steps=40,
            learning_rate=1e-2, warmup_steps=5, log_every=5, eval_every=40, eval_batches=2,
            checkpoint_every=20)


def tiny(tmp_path, **overrides) -> train.Config:
    return train.Config(**{**TINY, "workdir": str(tmp_path / "run"), **overrides})


def falls(history) -> bool:
    losses = [h["loss"] for h in history]
    return np.mean(losses[-2:]) < 0.85 * np.mean(losses[:2])


# No checkpoint along the way (saving is tested below, and took a quarter of each run here).
PRESET_RUN = dict(mesh="data:1", checkpoint_every=10_000)


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    """The dense preset's run, trained once per module: test_every_preset_trains[dense] checks
    it, and its workdir is the finished run of another model that
    test_workdir_of_another_model_is_refused needs."""
    tmp_path = tmp_path_factory.mktemp("dense")
    return tmp_path, train.train_and_evaluate(tiny(tmp_path, recipe="dense", **PRESET_RUN))


@pytest.mark.parametrize("recipe", sorted(presets.PRESETS))
def test_every_preset_trains(tmp_path, recipe, request):
    # monarch4 also settles its path choices on the whole step first (on the CPU: nothing to
    # settle, the step timed once and training unchanged)
    cfg = tiny(tmp_path, recipe=recipe, tune_paths=recipe == "monarch4", **PRESET_RUN)
    if recipe == "monarch4_proj":
        # projects given weights: start from a short dense run's final params
        train.train_and_evaluate(tiny(tmp_path / "dense", recipe="dense", steps=10, mesh="data:1"))
        cfg.steps, cfg.init_from = 20, str(tmp_path / "dense" / "run")
    if recipe == "dense":
        tmp_path, result = request.getfixturevalue("dense_run")
    else:
        result = train.train_and_evaluate(cfg)
    losses = [h["loss"] for h in result["history"]]
    if recipe == "monarch4_proj":
        # starts from trained weights: less to fall than from scratch, but it still learns
        assert losses[-1] < losses[0], losses
    else:
        assert falls(result["history"]), losses
    assert np.isfinite(result["eval"]["loss"])
    if recipe in ("gmp90", "rigl90", "set90", "static90"):
        assert result["history"][-1]["sparsity"] == pytest.approx(0.9, abs=0.01)
    written = (tmp_path / "run" / "summary.txt").read_text()
    assert "eval_loss" in written and (tmp_path / "run" / "curves.png").stat().st_size > 0


def test_xla_options_kept_by_path_tuning_compile_the_training_step(tmp_path, monkeypatch):
    import sparsejax
    from sparsejax.kernels import program_tuning

    options = {"xla_gpu_enable_triton_gemm": False}     # what tuning keeps on a GPU, say
    monkeypatch.setattr(sparsejax.SparseFunction, "tune", lambda self, step, *a, **kw: program_tuning.Tuning(
        1.0, (), {}, 0.9, dict(options)))
    seen, real_jit = [], jax.jit

    def spy(fun, *a, **kw):
        seen.append(kw.get("compiler_options"))
        return real_jit(fun, *a, **kw)

    monkeypatch.setattr(jax, "jit", spy)
    result = train.train_and_evaluate(tiny(tmp_path, recipe="monarch4", mesh="data:1", tune_paths=True,
                                           steps=4, eval_every=4, checkpoint_every=10_000))
    assert options in seen and np.isfinite(result["history"][-1]["loss"])


def test_vision_model_trains(tmp_path):
    cfg = tiny(tmp_path, model="mixer", recipe="nm24", batch_size=32, steps=60, mesh="data:1")
    result = train.train_and_evaluate(cfg)
    assert falls(result["history"]) and result["eval"]["accuracy"] > 0.3


def test_eight_devices_follow_the_one_device_curve(tmp_path):
    one = train.train_and_evaluate(tiny(tmp_path / "a", recipe="gmp90", mesh="data:1", steps=20))
    eight = train.train_and_evaluate(tiny(tmp_path / "b", recipe="gmp90", mesh="data:4,fsdp:2",
                                          steps=20))
    np.testing.assert_allclose([h["loss"] for h in eight["history"]],
                               [h["loss"] for h in one["history"]], rtol=2e-4)
    sharded = [x.sharding for x in jax.tree.leaves(eight["state"].params)]
    assert any("fsdp" in str(s.spec) for s in sharded)


def test_fsdp_step_gathers_parameters_and_splits_the_batch(tmp_path):
    # Left to XLA's propagation, fsdp-sharded weights made the matmuls model-parallel
    # (activations all-reduced after every layer: 1.09x of one H200 on two). The step
    # gathers the parameters instead: only the gradients are reduced.
    import re
    from jax.sharding import NamedSharding, PartitionSpec as P

    run = train.prepare(tiny(tmp_path, mesh="data:1,fsdp:2"))
    state, sfn, tx = train.create_state(run)
    mesh = run.mesh
    assert train.compute_sharding(mesh).spec == P()
    assert train.compute_sharding(train.make_mesh("data:2")) is None
    state_sharding = jax.tree.map(lambda x: train.fsdp_sharding(mesh, x), state)
    batch = run.train_batches.batch(0)

    def all_reduces(param_sharding):
        step = functools.partial(train.train_step, sfn=sfn, tx=tx, param_sharding=param_sharding)
        hlo = jax.jit(step, in_shardings=(state_sharding, NamedSharding(mesh, P(("data", "fsdp")))),
                      out_shardings=(state_sharding, None)).lower(state, batch).compile().as_text()
        return len(re.findall(r" all-reduce(?:-start)?\(", hlo))

    gathered, propagated = all_reduces(train.compute_sharding(mesh)), all_reduces(None)
    assert gathered < propagated, (gathered, propagated)


_HLO_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1}


def _all_gathers(hlo: str) -> dict:
    """{dtype: [count, bytes]} of the gathered results of a compiled program's all-gathers
    (an async ``all-gather-start`` prints a tuple of its operand and its result)."""
    import re
    out = {}
    for line in hlo.splitlines():
        m = re.search(r"= (.*?) all-gather(-start)?\(", line)
        if m:
            dtype, dims = re.findall(r"(\w+)\[([\d,]*)\]", m.group(1))[-1]
            c = out.setdefault(dtype, [0, 0])
            c[0] += 1
            c[1] += int(np.prod([int(d) for d in dims.split(",") if d])) * _HLO_BYTES[dtype]
    return out


@pytest.mark.parametrize("step_name", ["train_step", "eval_step"])
def test_fsdp_step_gathers_a_masked_weight_once(tmp_path, step_name):
    # With the masks left fsdp-sharded while the step gathers the weights, XLA multiplied each
    # weight by its mask on the shard and all-gathered the product, and under SR-STE also the
    # backward's decay term: three float32 gathers per masked weight where dense has one
    # (nm24 data:1,fsdp:2 at 1.72x of one H200 on two, dense at 1.80x). The masks now follow
    # the weights, and are stored replicated (fsdp_sharding): nm24 gathers exactly what dense
    # gathers, the weights, and no mask.
    from jax.sharding import NamedSharding, PartitionSpec as P

    def gathers(recipe):
        run = train.prepare(tiny(tmp_path / recipe, recipe=recipe, mesh="data:1,fsdp:2"))
        state, sfn, tx = train.create_state(run)
        mesh = run.mesh
        state_sharding = jax.tree.map(lambda x: train.fsdp_sharding(mesh, x), state)
        step = functools.partial(getattr(train, step_name), sfn=sfn,
                                 param_sharding=train.compute_sharding(mesh),
                                 **({"tx": tx} if step_name == "train_step" else {}))
        hlo = jax.jit(step, in_shardings=(state_sharding, NamedSharding(mesh, P(("data", "fsdp")))),
                      ).lower(state, run.train_batches.batch(0)).compile().as_text()
        mask_entries = sum(np.size(m) for m in jax.tree.leaves(state.sstate["masks"]))
        return _all_gathers(hlo), mask_entries

    dense, _ = gathers("dense")
    nm, mask_entries = gathers("nm24")
    assert mask_entries > 0
    assert nm == dense, (nm, dense)
    sharding = train.fsdp_sharding(train.prepare(tiny(tmp_path / "m", mesh="data:1,fsdp:2")).mesh,
                                   jax.ShapeDtypeStruct((64, 128), jnp.bool_))
    assert sharding.is_fully_replicated


def _run_cli(args, env_extra=None):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env_extra or {})}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=600)


def _cli_args(workdir, **overrides):
    settings = {**TINY, "steps": 30, "checkpoint_every": 10, "workdir": str(workdir),
                "recipe": "rigl90", "mesh": "data:1", **overrides}
    return [f"--{k}={v}" for k, v in settings.items()]


def test_sigkill_and_resume_ends_bit_identical(tmp_path):
    # On one device (mesh data:1, a third less time per run than the eight the CLI takes by
    # default); restoring into sharded templates is test_checkpointing's.
    straight = _run_cli(_cli_args(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr[-2000:]
    # the test-only kill switch is an environment variable, not a flag --help would show
    killed = _run_cli(_cli_args(tmp_path / "killed"),
                      env_extra={"SPARSEJAX_TEST_SIGKILL_AT_STEP": "20"})
    assert killed.returncode == -9
    resumed = _run_cli(_cli_args(tmp_path / "killed"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from step 20" in resumed.stderr + resumed.stdout

    def final(workdir):
        cfg = train.Config(**{**TINY, "steps": 30, "workdir": str(workdir), "recipe": "rigl90",
                              "mesh": "data:1"})
        run = train.prepare(cfg)
        return run.ckpt.restore(train.create_state(run)[0]).state

    a, b = final(tmp_path / "straight"), final(tmp_path / "killed")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_corrupt_newest_checkpoint_falls_back(tmp_path):
    cfg = tiny(tmp_path, recipe="nm24", steps=20, checkpoint_every=10, mesh="data:1")
    train.train_and_evaluate(cfg)
    ckpt_dir = tmp_path / "run" / "checkpoints" / "20"
    for f in ckpt_dir.rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "state" in str(f):
            f.write_bytes(b"\0" * f.stat().st_size)
    with pytest.warns(RuntimeWarning, match="cannot be read"):
        result = train.train_and_evaluate(cfg)
    assert result["history"][0]["step"] == 15    # resumed from step 10, logging every 5


@pytest.mark.parametrize("overrides,message", [
    ({"recipe": "gmp95"}, "unknown recipe 'gmp95'"),
    ({"model": "resnet"}, "unknown model 'resnet'"),
    ({"data": "/no/such/corpus.txt"}, "does not exist"),
    ({"seq_len": 10_000_000}, "longer than"),
    ({"batch_size": 6, "mesh": "data:4"}, "must be divisible by the 4 devices"),
    ({"optimizer": "adamq"}, "unknown optimizer 'adamq'"),
])
def test_bad_input_is_one_line_before_compiling(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        train.prepare(tiny(tmp_path, **overrides))


def test_empty_data_path(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        train.prepare(tiny(tmp_path, data=str(empty)))


def test_workdir_of_another_model_is_refused(dense_run):
    tmp_path, _ = dense_run          # a finished run's workdir (its settings but the model's)
    with pytest.raises(ValueError, match="different"):
        train.prepare(tiny(tmp_path, recipe="dense", d_model=48, **PRESET_RUN))


def test_cli_prints_one_line_error(tmp_path):
    out = _run_cli(_cli_args(tmp_path, recipe="nope"))
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1].startswith("train.py: unknown recipe 'nope'")


def test_recipe_file(tmp_path):
    spec = {"rules": [{"rule": "NM", "pattern": "re:.*mlp.*/kernel", "n": 2, "m": 4},
                      {"rule": "Prune", "pattern": "re:.*attn.*/kernel", "sparsity": 0.5}]}
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(spec))
    result = train.train_and_evaluate(tiny(tmp_path, recipe=str(path), steps=20, mesh="data:1"))
    rules = {r.rule.split("(")[0] for r in result["report"].rows}
    assert rules == {"NM", "Prune"}
