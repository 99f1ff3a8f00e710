"""SparseLoCo / DiLoCo pieces alone (compressor, error feedback, averaging, outer step) and the
outer loop on four CPU devices of one process."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sparsejax.distributed import local_sgd
from sparsejax.optim import sparseloco as sl


def topk_reference(x: np.ndarray, chunk: int, k: int, value_bits: int = 2) -> np.ndarray:
    """What a message stands for, written plainly with numpy: per zero-padded chunk the k
    largest magnitudes, 2-bit values = sign × the mean magnitude of their half (split at the
    chunk's mean kept magnitude)."""
    flat = x.reshape(-1).astype(np.float64)
    n = flat.size
    if n < chunk:
        chunk, k = n, max(1, min(n, round(k * n / chunk)))
    chunks = -(-n // chunk)
    padded = np.zeros(chunks * chunk)
    padded[:n] = flat
    out = np.zeros_like(padded)
    for c in range(chunks):
        part = padded[c * chunk:(c + 1) * chunk]
        idx = np.argsort(-np.abs(part), kind="stable")[:k]
        vals = part[idx]
        if value_bits == 2:
            mags = np.abs(vals)
            large = mags >= mags.mean()
            hi = mags[large].mean()
            lo = mags[~large].mean() if (~large).any() else 0.0
            vals = np.sign(vals) * np.where(large, hi, lo)
            vals[part[idx] == 0] = lo     # zeros (padding) count as positive
        out[c * chunk + idx] = vals
    return out[:n].reshape(x.shape)


@pytest.mark.parametrize("shape,chunk,k,bits", [((37, 19), 64, 5, 2), ((300,), 128, 7, 32),
                                                ((3, 5, 40), 100, 13, 2), ((20,), 64, 6, 2)])
def test_chunked_topk_matches_the_numpy_reference(shape, chunk, k, bits):
    x = jax.random.normal(jax.random.key(sum(shape)), shape)
    compressor = sl.chunked_topk(chunk, k=k, value_bits=bits)
    message = jax.jit(compressor.encode)(x)
    out = jax.jit(compressor.decode, static_argnums=(1, 2))(message, x.shape, x.dtype)
    np.testing.assert_allclose(out, topk_reference(np.asarray(x), chunk, k, bits), rtol=1e-5, atol=1e-6)


def test_message_layout_and_bytes():
    x = jax.random.normal(jax.random.key(1), (33, 100))       # 3300 entries: 4 chunks of 1024, padded
    compressor = sl.chunked_topk(1024, density=0.01)          # k = 10
    message = jax.jit(compressor.encode)(x)
    assert message.indices.shape == (4, 10) and message.indices.dtype == jnp.uint16
    assert message.codes.shape == (4, 3) and message.codes.dtype == jnp.uint8   # ceil(10 / 4) bytes
    assert message.levels.shape == (4, 2) and message.levels.dtype == jnp.float32
    assert sl.message_nbytes(message) == 4 * (10 * 2 + 3 + 8)
    assert sl.message_nbytes(jax.eval_shape(sl.full_precision().encode, x)) == 3300 * 4


def test_small_leaf_is_one_chunk_with_k_scaled_down():
    message = jax.jit(sl.chunked_topk(4096, density=0.03).encode)(jnp.arange(1.0, 257.0))   # k 123 -> 8
    assert message.indices.shape == (1, 8)
    assert sorted(np.asarray(message.indices[0]).tolist()) == list(range(248, 256))


@pytest.mark.parametrize("kwargs,match", [
    (dict(chunk_size=64, k=65), "k=65 is larger than chunk_size=64"),
    (dict(chunk_size=64, density=1.5), "density=1.5 must be in"),
    (dict(chunk_size=64), "exactly one of density"),
    (dict(chunk_size=64, k=4, density=0.1), "exactly one of density"),
    (dict(chunk_size=0, k=1), "chunk_size=0"),
    (dict(chunk_size=64, k=4, value_bits=3), "value_bits=3"),
])
def test_bad_compressor_settings_are_one_line_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sl.chunked_topk(**kwargs)


def test_error_feedback_keeps_exactly_what_was_not_sent():
    params = {"w": jnp.zeros((40, 30)), "b": jnp.zeros((30,))}
    compressor = sl.chunked_topk(256, k=8)
    tx = sl.error_feedback(compressor, beta=0.9)
    state = tx.init(params)
    chex.assert_trees_all_equal(state.error, params)
    update = jax.jit(tx.update)
    decode = jax.jit(lambda m: sl.decode_tree(compressor, m, params))
    rng = np.random.default_rng(0)
    for _ in range(3):
        delta = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
        accumulated = jax.tree.map(lambda e, d: 0.9 * np.asarray(e) + np.asarray(d), state.error, delta)
        messages, state = update(delta, state)
        sent = decode(messages)
        chex.assert_trees_all_close(jax.tree.map(jnp.add, state.error, sent), accumulated, atol=1e-6)
        # The sent part is sparse: 8 per chunk of 256 (the bias is one chunk of 30 with k 1).
        assert int(jnp.sum(sent["w"] != 0)) == 8 * math.ceil(1200 / 256)
        assert int(jnp.sum(sent["b"] != 0)) == 1


def test_full_precision_with_no_decay_sends_delta_whole():
    tx = sl.error_feedback(sl.full_precision(), beta=0.0)
    delta = {"w": jax.random.normal(jax.random.key(3), (7, 5))}
    messages, state = tx.update(delta, tx.init(delta))
    chex.assert_trees_all_equal(messages, delta)
    chex.assert_trees_all_equal(state.error, jax.tree.map(jnp.zeros_like, delta))
    with pytest.raises(ValueError, match="beta=1.5"):
        sl.error_feedback(sl.full_precision(), beta=1.5)


def test_average_messages_is_the_mean_of_the_decoded_messages():
    compressor = sl.chunked_topk(64, k=6)
    like = {"w": jnp.zeros((10, 13))}
    xs = [{"w": jax.random.normal(jax.random.key(i), (10, 13))} for i in range(3)]
    encode = jax.jit(lambda x: sl.encode_tree(compressor, x))
    messages = [encode(x) for x in xs]
    stacked = jax.tree.map(lambda *m: jnp.stack(m), *messages)
    average = jax.jit(lambda s: sl.average_messages(compressor, s, like))(stacked)
    expected = sum(topk_reference(np.asarray(x["w"]), 64, 6) for x in xs) / 3
    np.testing.assert_allclose(average["w"], expected, rtol=1e-5, atol=1e-6)


def test_outer_steps():
    theta, average = {"w": jnp.ones(3)}, {"w": jnp.array([0.5, -1.0, 2.0])}
    updates, _ = sl.sparseloco_outer(1.0).update(average, sl.sparseloco_outer(1.0).init(theta))
    chex.assert_trees_all_close(updates, jax.tree.map(jnp.negative, average))
    tx = sl.diloco_outer(0.7, 0.9)
    state, momentum = tx.init(theta), jnp.zeros(3)
    for _ in range(2):     # Nesterov: m = 0.9 m + g; step = -lr (g + 0.9 m)
        updates, state = tx.update(average, state)
        momentum = 0.9 * momentum + average["w"]
        np.testing.assert_allclose(updates["w"], -0.7 * (average["w"] + 0.9 * momentum), rtol=1e-6)


# ----------------------------------------------------------------------------- the outer loop


class ToyState(struct.PyTreeNode):
    step: jax.Array
    params: dict
    opt_state: object


def _toy(inner_lr=0.1, replicas=4):
    mesh = Mesh(np.array(jax.devices()[:replicas]).reshape(replicas, 1), ("data", "fsdp"))
    params = {"w": jax.random.normal(jax.random.key(0), (16, 3)), "b": jnp.zeros((3,))}
    inner = optax.sgd(inner_lr)

    def loss(p, batch):
        return jnp.mean((batch["x"] @ p["w"] + p["b"] - batch["y"]) ** 2)

    def train_step(state, batch):
        value, grads = jax.value_and_grad(loss)(state.params, batch)
        updates, opt_state = inner.update(grads, state.opt_state, state.params)
        return (state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              opt_state=opt_state), {"loss": value})

    state = ToyState(step=jnp.zeros([], jnp.int32), params=params, opt_state=inner.init(params))
    batches = [{"x": jax.random.normal(jax.random.key(10 + i), (8, 16)),
                "y": jax.random.normal(jax.random.key(50 + i), (8, 3))} for i in range(6)]
    return mesh, state, train_step, loss, batches


def _run(loop, mesh, state, train_step, batches):
    state = loop.init(state)   # copied below: the loop donates its state, the test keeps its own
    state = jax.device_put(jax.tree.map(jnp.copy, state), loop.shardings(state))
    step = loop.wrap(train_step, total_steps=len(batches))
    batch_sharding = NamedSharding(mesh, P("data"))
    for batch in batches:
        state, _ = step(state, jax.device_put(batch, batch_sharding))
    return state


def test_diloco_with_one_inner_sgd_step_is_data_parallel_sgd():
    mesh, state, train_step, loss, batches = _toy()
    loop = local_sgd.LocalSGD(mesh, compressor=sl.full_precision(), outer_optimizer=optax.sgd(1.0),
                              inner_steps=1, echo=None)
    out = _run(loop, mesh, state, train_step, batches)
    params, grad = state.params, jax.jit(jax.grad(loss))
    for batch in batches:      # plain SGD on the whole batch (the mean of the replicas' gradients)
        params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grad(params, batch))
    chex.assert_trees_all_close(jax.device_get(out.params), params, atol=1e-5)
    assert [r.sent_bytes for r in loop.records] == [(16 * 3 + 3) * 4] * 6


def test_sparseloco_loop_measures_its_messages_and_restarts_replicas_from_the_shared_params():
    mesh, state, train_step, _, batches = _toy()
    compressor = sl.chunked_topk(16, k=2)
    loop = local_sgd.LocalSGD(mesh, compressor=compressor, outer_optimizer=sl.sparseloco_outer(),
                              inner_steps=4, error_decay=0.95, echo=None)
    out = _run(loop, mesh, state, train_step, batches)
    # w: 48 entries = 3 chunks of 16, k 2; b: one chunk of 3, k 1 (uint16 indices, 1 code byte, 2 levels).
    expected = 3 * (2 * 2 + 1 + 8) + 1 * (1 * 2 + 1 + 8)
    assert [(r.step, r.inner_steps, r.sent_bytes) for r in loop.records] == [(4, 4, expected), (6, 2, expected)]
    assert loop.records[0].ddp_bytes == 4 * (48 + 3) * 4
    assert loop.records[0].sent_parts == {"indices": 3 * 4 + 2, "values": 3 + 1, "levels": 3 * 8 + 8}
    shared = jax.device_get(out.params)
    local = jax.device_get(out.opt_state.local_params)
    for r in range(4):
        chex.assert_trees_all_close(jax.tree.map(lambda x: x[r], local), shared)
    # Each outer step moved at most k entries per chunk of w per replica (4 replicas, 2 steps).
    moved = np.sum(np.asarray(shared["w"]) != np.asarray(state.params["w"]))
    assert 0 < moved <= 4 * 2 * 3 * 2
    assert np.all(np.isfinite(jax.device_get(out.opt_state.error.error["w"])))


def test_loop_refuses_a_mesh_with_other_axes():
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "fsdp"))
    with pytest.raises(ValueError, match="only axis larger than 1"):
        local_sgd.LocalSGD(mesh, compressor=sl.full_precision(), outer_optimizer=optax.sgd(1.0),
                           inner_steps=2)
