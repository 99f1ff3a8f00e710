"""Checkpoints: exact round trip, keep-N, corrupt-newest fallback, signature mismatch; logging."""

import glob
import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sparsejax import optim
from sparsejax.training import checkpointing, logging_utils


def _state(seed):
    k = jax.random.split(jax.random.key(seed), 3)
    params = {"dense": {"kernel": jax.random.normal(k[0], (8, 5)), "bias": jax.random.normal(k[1], (5,))},
              "scale": jax.random.normal(k[2], (3,)).astype(jnp.bfloat16)}
    masks = {"dense": {"kernel": jax.random.bernoulli(k[0], 0.3, (8, 5)), "bias": None}, "scale": None}
    opt_state = optax.adamw(1e-3).init(params)
    opt_state = jax.tree.map(lambda x: x + 0.5 if jnp.issubdtype(x.dtype, jnp.floating) else x, opt_state)
    return {"params": params, "masks": masks, "opt": opt_state,
            "rng": jax.random.key_data(jax.random.key(seed + 100))}


def _assert_identical(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_is_exact_and_keeps_the_last_n(tmp_path):
    signature = {"model": "transformer", "d_model": 24, "heads": (3,)}
    with checkpointing.Checkpointer(tmp_path, signature=signature, max_to_keep=2) as ckpt:
        assert ckpt.restore(_state(0)) is None
        for step in (10, 20, 30):
            ckpt.save(step, _state(step), data_position=step * 4, extra={"loss": step / 7})
        ckpt.wait()
        assert ckpt.all_steps() == [20, 30]
    with checkpointing.Checkpointer(tmp_path, signature=signature, max_to_keep=2) as ckpt:
        restored = ckpt.restore(_state(1))
        assert (restored.step, restored.data_position) == (30, 120)
        assert restored.extra == {"loss": 30 / 7}
        _assert_identical(restored.state, _state(30))
        _assert_identical(ckpt.restore(_state(1), step=20).state, _state(20))


def test_restore_takes_the_templates_sharding(tmp_path):
    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    sharded = NamedSharding(mesh, P("data"))
    state = {"w": jax.device_put(jax.random.normal(jax.random.key(2), (8, 3)), sharded)}
    with checkpointing.Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state)
        ckpt.wait()
        template = {"w": jax.ShapeDtypeStruct((8, 3), jnp.float32, sharding=sharded)}
        restored = ckpt.restore(template)
    assert restored.state["w"].sharding == sharded
    np.testing.assert_array_equal(restored.state["w"], state["w"])


@pytest.mark.parametrize("damage", ["array_bytes", "metadata", "fingerprint"])
def test_corrupt_newest_checkpoint_warns_and_uses_the_previous(tmp_path, damage):
    with checkpointing.Checkpointer(tmp_path, max_to_keep=3) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, _state(step), data_position=step)
    newest = tmp_path / "3"
    if damage == "array_bytes":
        # Which data file holds which array, and where, is orbax's business (one flipped byte can
        # land in an unreferenced region): damage the back half of every data file instead.
        chunks = glob.glob(str(newest / "state" / "**" / "d" / "*"), recursive=True)
        assert chunks
        for chunk in chunks:
            raw = bytearray(open(chunk, "rb").read())
            raw[len(raw) // 2:] = bytes(b ^ 0xFF for b in raw[len(raw) // 2:])
            open(chunk, "wb").write(bytes(raw))
    elif damage == "metadata":
        (newest / "state" / "_METADATA").write_text("{not json")
    else:   # bytes that still decode, but not to what was saved
        meta_path = newest / "meta" / "metadata"
        meta = json.loads(meta_path.read_text())
        meta["fingerprint"][0] = (meta["fingerprint"][0] + 1) % 2**32
        meta_path.write_text(json.dumps(meta))
    with checkpointing.Checkpointer(tmp_path, max_to_keep=3) as ckpt:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            restored = ckpt.restore(_state(0))
        assert restored.step == 2 and restored.data_position == 2
        _assert_identical(restored.state, _state(2))
        assert any("step 3" in str(w.message) and "previous" in str(w.message) for w in caught)
        assert ckpt.all_steps() == [1, 2]
        assert (tmp_path / "corrupt" / "3").is_dir()
        # The run goes on and can write step 3 again.
        ckpt.save(3, _state(33), data_position=3)
        ckpt.wait()
        _assert_identical(ckpt.restore(_state(0)).state, _state(33))


def test_a_different_model_is_refused_in_one_line(tmp_path):
    with checkpointing.Checkpointer(tmp_path, signature={"model": "transformer", "d_model": 24}) as ckpt:
        ckpt.save(1, _state(1))
    with pytest.raises(ValueError, match="different run") as info:
        checkpointing.Checkpointer(tmp_path, signature={"model": "transformer", "d_model": 32})
    assert "d_model: 24 in the checkpoint, 32 now" in str(info.value) and "\n" not in str(info.value)
    checkpointing.check_signature(tmp_path, {"model": "transformer", "d_model": 24})     # same: fine


def test_state_fingerprint_sees_one_changed_bit():
    state = _state(3)
    before = checkpointing.state_fingerprint(state)
    flipped = jax.tree.map(lambda x: x, state)
    w = np.asarray(state["params"]["dense"]["kernel"]).copy()
    w.view(np.uint32)[4, 2] ^= 1
    flipped["params"]["dense"]["kernel"] = jnp.asarray(w)
    after = checkpointing.state_fingerprint(flipped)
    assert before != after and sum(a != b for a, b in zip(before, after)) == 1


# ---------------------------------------------------------------- logging


def test_metrics_writer_jsonl_tensorboard_and_resume(tmp_path):
    rng = np.random.default_rng(4)
    losses = rng.random(6) + 1.0
    with logging_utils.MetricsWriter(tmp_path) as writer:
        for step, loss in enumerate(losses):
            writer.write(step, {"loss": jnp.float32(loss), "sparsity": step / 10})
        writer.write(5, {"loss": 1.25}, split="eval")
        assert writer.tensorboard_enabled
    records = logging_utils.read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4, 5, 5]
    np.testing.assert_allclose([r["loss"] for r in records[:6]], losses, rtol=1e-6)
    assert glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
    # A run killed after step 5 and resumed from a checkpoint at step 3 logs 4 and 5 again.
    with logging_utils.MetricsWriter(tmp_path, resume_step=3) as writer:
        writer.write(4, {"loss": 0.5})
    steps = [r["step"] for r in logging_utils.read_metrics(tmp_path / "metrics.jsonl")]
    assert steps == [0, 1, 2, 3, 4]


def test_plot_progress_and_summary(tmp_path):
    rng = np.random.default_rng(5)
    records = [{"step": s, "split": "train", "loss": float(3 - s / 10 + rng.random() / 10),
                "sparsity": min(s / 20, 0.9)} for s in range(30)]
    records += [{"step": 29, "split": "eval", "loss": 0.3}]
    png = logging_utils.plot_curves(records, tmp_path / "curves.png", title="gmp90")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(png) > 5_000

    import io
    stream = io.StringIO()
    line = logging_utils.ProgressLine(100, tokens_per_step=512, stream=stream)
    line.update(10, {"loss": 2.5, "sparsity": 0.5})
    text = line.update(20, {"loss": 2.25, "sparsity": 0.75})
    assert text.startswith("step 20/100 [####") and "loss 2.25" in text and "sparsity 0.750" in text
    assert "tok/s" in text and "eta" in text and stream.getvalue().count("\n") == 2

    masks = {"a": {"kernel": jnp.asarray(rng.random((6, 4)) < 0.25)}, "b": None}
    per_layer = optim.masked_sparsity(masks, by_path=True)
    assert list(per_layer) == ["a/kernel"]
    np.testing.assert_allclose(per_layer["a/kernel"], 1 - np.asarray(masks["a"]["kernel"]).mean())
    summary = logging_utils.format_summary({"eval_loss": 1.5}, per_layer)
    assert "eval_loss: 1.5" in summary and "a/kernel" in summary
