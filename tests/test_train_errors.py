"""train.py as a new user meets it: --help, one-line errors, reruns and what the summary says."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

import sparsejax as sj
import train

ROOT = pathlib.Path(__file__).resolve().parents[1]

TINY = dict(d_model=32, n_layers=1, n_heads=2, d_ff=64, seq_len=32, batch_size=8, steps=10,
            learning_rate=1e-2, warmup_steps=2, log_every=5, eval_every=10, eval_batches=2,
            checkpoint_every=5, mesh="data:1")


def tiny(path, **overrides) -> train.Config:
    return train.Config(**{**TINY, "workdir": str(path), **overrides})


def _cli(args, cwd=ROOT):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=600)


def _recipe_file(tmp_path, rules) -> str:
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps({"rules": rules}))
    return str(path)


# ----------------------------------------------------------------------------- --help


def test_every_flag_has_a_sentence_and_a_group():
    helps = train.flag_help()
    fields = [f.name for f in dataclasses.fields(train.Config)]
    shown = [f for f in fields if f not in train._HIDDEN_FIELDS]
    assert sorted(helps) == sorted(shown)
    for name, (group, text) in helps.items():
        assert group and text.endswith(".") and len(text) > len(name) + 15, (name, text)
        assert text.lower().rstrip(".") != name.replace("_", " ")
    assert "sigkill_at_step" in fields and "sigkill_at_step" not in helps


def test_help_usage_is_readable_and_hides_test_flags(tmp_path):
    out = _cli(["--help"], cwd=tmp_path)
    text = out.stdout + out.stderr
    assert out.returncode in (0, 1), text[-2000:]     # absl exits 1 after --help
    assert "python train.py                                   # an LM pruned to 90 percent" in text
    assert "train.pyparse" not in text and "sigkill" not in text
    assert "[model and data] --model --data" in text
    assert "--recipe: [sparsity and optimization] Sparsity preset" in text
    assert "xla_force_host_platform_device_count" in text


def test_mesh_larger_than_one_cpu_says_how_to_get_devices(tmp_path):
    with pytest.raises(ValueError, match=r"needs 64 devices; 8 are available; on CPU, set "
                                         r"XLA_FLAGS=--xla_force_host_platform_device_count=64"):
        train.prepare(tiny(tmp_path / "run", mesh="data:64"))


# ----------------------------------------------------------------------------- one-line errors


def test_unwritable_workdir_is_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ValueError, match=r"^--workdir .*a_file/run: cannot write there"):
        train.prepare(tiny(blocker / "run"))


def test_projection_recipe_needs_init_from(tmp_path):
    with pytest.raises(ValueError, match=r"--recipe monarch4_proj: Monarch\(.*\) projects the "
                                         r"weights .* needs --init_from"):
        train.prepare(tiny(tmp_path / "run", recipe="monarch4_proj"))


def test_init_from_a_folder_without_params(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"--init_from .*empty: no params.msgpack there"):
        train.prepare(tiny(tmp_path / "run", init_from=str(tmp_path / "empty")))


def test_init_from_another_model_is_one_line(tmp_path):
    def params_of(d_model):
        model, _ = train.build_model(tiny(tmp_path, d_model=d_model), vocab_size=256)
        shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
        return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)

    other = tmp_path / "other"
    other.mkdir()
    (other / train.FINAL_PARAMS).write_bytes(serialization.to_bytes(params_of(48)))
    with pytest.raises(ValueError, match=r"^--init_from .*other: its params.msgpack holds a "
                                         r"different model \(params/.*: \(.*48.*\) there, "
                                         r"\(.*32.*\) here"):
        train.load_final_params(str(other), params_of(32))
    same = train.load_final_params(str(other), params_of(48))
    assert jax.tree.structure(same) == jax.tree.structure(params_of(48))


def test_recipe_pattern_that_matches_nothing_is_one_line_on_the_command_line(tmp_path):
    recipe = _recipe_file(tmp_path, [{"rule": "Prune", "pattern": "*no_such_weight*"}])
    out = _cli([f"--{k}={v}" for k, v in {**TINY, "workdir": tmp_path / "run",
                                         "recipe": recipe}.items()])
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"train.py: --recipe {recipe}: Prune('*no_such_weight*'")
    assert "the pattern matches no parameter" in last


# ----------------------------------------------------------------------------- reruns, summary


def test_rerun_keeps_the_summary_and_refuses_a_new_schedule(tmp_path):
    cfg = tiny(tmp_path / "run", recipe="gmp90")
    first = train.train_and_evaluate(cfg)
    summary = (tmp_path / "run" / "summary.txt").read_text()
    # the summary says what the run did: GMP's masks, not the recipe's placeholder sparsity=0.0
    assert "sparsity=0.0" not in summary and "gmp90: gradual magnitude pruning" in summary
    assert "recipe: gmp90" in summary
    assert all(h["sparsity"] >= 0.0 for h in first["history"])

    again = train.train_and_evaluate(tiny(tmp_path / "run", recipe="gmp90"))
    assert again["eval"] == pytest.approx(first["eval"])
    assert (tmp_path / "run" / "summary.txt").read_text() == summary

    for change, message in [({"steps": 20}, "steps: 10 in the checkpoint, 20 now"),
                            ({"learning_rate": 1e-3}, "learning_rate: 0.01 in the checkpoint"),
                            ({"warmup_steps": 3}, "warmup_steps: 2 in the checkpoint")]:
        with pytest.raises(ValueError, match=message):
            train.prepare(tiny(tmp_path / "run", recipe="gmp90", **change))

    # every checkpoint unreadable: one line naming the folder to move aside
    for f in (tmp_path / "run" / "checkpoints").rglob("*"):
        if f.is_file() and f.name != "sparsejax_signature.json":
            f.write_bytes(b"\0" * max(f.stat().st_size, 1))
    with pytest.warns(RuntimeWarning, match="cannot be read"):
        with pytest.raises(train.SetupError, match=r"no checkpoint in .* can be read.*; move "
                                                   r".*checkpoints aside to start afresh"):
            train.train_and_evaluate(tiny(tmp_path / "run", recipe="gmp90"))


def test_progress_sparsity_is_never_negative_and_absent_without_masks():
    soft = {"w": jnp.full((4, 4), 1.0000001, jnp.float32), "b": None}
    assert float(sj.optim.masked_sparsity(soft)) == 0.0
    assert not np.signbit(float(sj.optim.masked_sparsity(soft)))
    assert sj.optim.masked_sparsity({"w": None}) is None
    from sparsejax.training import logging_utils
    per_layer = sj.optim.masked_sparsity({"w": np.full((4, 4), 1.0000001, np.float32)},
                                         by_path=True)
    assert per_layer["w"] == 0.0 and not np.signbit(per_layer["w"])
