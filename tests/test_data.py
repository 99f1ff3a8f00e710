"""Data: offline corpora, splits, deterministic resumable batches, bad input."""

import pathlib

import numpy as np
import pytest

from sparsejax.training import data


@pytest.fixture(scope="module")
def stdlib():
    return data.load_stdlib_corpus(max_bytes=300_000)


def test_stdlib_corpus_is_real_python_source_split_by_file(stdlib):
    assert stdlib.vocab_size == 256 and stdlib.train.dtype == np.uint8
    assert 200_000 < stdlib.train.size + stdlib.valid.size <= 300_000
    assert stdlib.valid.size > 0 and stdlib.train.size > stdlib.valid.size
    text = bytes(stdlib.train[:200_000]).decode("utf-8", errors="replace")
    assert "def " in text and "import " in text
    files = data.stdlib_files(max_bytes=300_000)
    assert files == sorted(files, key=lambda f: f.as_posix())
    assert not any(part in ("site-packages", "test", "tests") for f in files for part in f.parts[-3:-1])
    # Deterministic: the same bytes on every call.
    assert data.load_stdlib_corpus(max_bytes=300_000).fingerprint == stdlib.fingerprint


def test_text_folder_split_by_file_and_single_file_tail(tmp_path):
    rng = np.random.default_rng(0)
    docs = {f"doc_{i:02d}.txt": bytes(rng.integers(32, 127, 50 + i).astype(np.uint8)) for i in range(40)}
    for name, body in docs.items():
        (tmp_path / name).write_bytes(body)
    (tmp_path / ".hidden").write_bytes(b"never read")
    d = data.load_text_data(str(tmp_path), valid_fraction=0.2)
    assert d.train.size + d.valid.size == sum(len(b) for b in docs.values())
    held = [n for n in sorted(docs) if bytes(d.valid).find(docs[n]) >= 0]
    assert 0 < len(held) < 40                                   # whole files went to the held-out side
    assert sum(len(docs[n]) for n in held) == d.valid.size

    single = tmp_path / "one.txt"
    single.write_bytes(bytes(rng.integers(32, 127, 1000).astype(np.uint8)))
    d1 = data.load_text_data(str(single), valid_fraction=0.1)
    assert d1.valid.size == 100
    np.testing.assert_array_equal(np.concatenate([d1.train, d1.valid]),
                                  np.frombuffer(single.read_bytes(), np.uint8))


@pytest.mark.parametrize("suffix, dtype", [(".npy", np.int32), (".bin", np.uint16)])
def test_token_files(tmp_path, suffix, dtype):
    ids = np.random.default_rng(1).integers(0, 1000, 5003).astype(dtype)
    path = tmp_path / f"ids{suffix}"
    np.save(path, ids) if suffix == ".npy" else ids.tofile(path)
    d = data.load_text_data(str(path), valid_fraction=0.1)
    assert d.vocab_size == int(ids.max()) + 1
    np.testing.assert_array_equal(np.concatenate([d.train, d.valid]), ids)
    b = next(iter(data.LMBatches(d.train, 3, 17, seed=2)))
    assert b["inputs"].dtype == np.int32 and b["inputs"].max() < d.vocab_size


def test_batches_are_a_function_of_seed_and_position(stdlib):
    it = data.LMBatches(stdlib.train, 5, 33, seed=3)
    first = [next(it) for _ in range(4)]
    assert it.position == 4
    resumed = data.LMBatches(stdlib.train, 5, 33, seed=3, position=2)
    for expected in first[2:]:
        got = next(resumed)
        np.testing.assert_array_equal(got["inputs"], expected["inputs"])
    assert not np.array_equal(first[0]["inputs"], first[1]["inputs"])
    other_seed = data.LMBatches(stdlib.train, 5, 33, seed=4).batch(0)
    assert not np.array_equal(other_seed["inputs"], first[0]["inputs"])
    b = first[0]
    assert b["inputs"].shape == (5, 33)
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])    # targets shift by one
    # Windows are contiguous pieces of the corpus.
    row = bytes(np.concatenate([b["inputs"][0], b["targets"][0, -1:]]).astype(np.uint8))
    assert bytes(stdlib.train).find(row) >= 0


def test_processes_split_the_global_batch(stdlib):
    whole = data.LMBatches(stdlib.train, 6, 9, seed=5).batch(7)
    parts = [data.LMBatches(stdlib.train, 6, 9, seed=5, process_index=i, process_count=3).batch(7)
             for i in range(3)]
    np.testing.assert_array_equal(np.concatenate([p["inputs"] for p in parts]), whole["inputs"])
    with pytest.raises(ValueError, match="batch_size=6 must be a multiple of the process count"):
        data.LMBatches(stdlib.train, 6, 9, process_count=4)


def test_eval_batches_cover_the_held_out_split_once(stdlib):
    tokens = stdlib.valid[:1000]
    batches = list(data.lm_eval_batches(tokens, 4, 37))
    n_windows = 999 // 37
    assert sum(b["weights"][:, 0].sum() for b in batches) == n_windows
    inputs = np.concatenate([b["inputs"] for b in batches])[:n_windows]
    np.testing.assert_array_equal(inputs.reshape(-1), tokens[:n_windows * 37])
    assert all(b["inputs"].shape == (4, 37) for b in batches)
    assert len(list(data.lm_eval_batches(tokens, 4, 37, max_batches=2))) == 2


def test_digits_and_image_batches():
    d = data.load_digits(valid_fraction=0.25, seed=6)
    assert d.train_images.shape[1:] == (8, 8, 1) and d.train_images.dtype == np.float32
    assert 0.0 <= d.train_images.min() and d.train_images.max() <= 1.0
    assert d.train_labels.size + d.valid_labels.size == 1797
    assert set(np.unique(d.train_labels)) == set(range(10))
    it = data.ImageBatches(d.train_images, d.train_labels, 100, seed=7)
    epoch = [it.batch(p)["labels"] for p in range(it.steps_per_epoch)]
    seen = np.concatenate(epoch)
    assert seen.size == it.steps_per_epoch * 100
    np.testing.assert_array_equal(it.batch(3)["images"], data.ImageBatches(
        d.train_images, d.train_labels, 100, seed=7).batch(3)["images"])
    assert not np.array_equal(it.batch(0)["labels"], it.batch(it.steps_per_epoch)["labels"])
    evals = list(data.image_eval_batches(d.valid_images, d.valid_labels, 64))
    assert sum(b["weights"].sum() for b in evals) == d.valid_labels.size


def test_bad_input_is_one_line_and_says_what_to_do(tmp_path, stdlib):
    cases = [
        (lambda: data.load_text_data(str(tmp_path / "missing.txt")), "does not exist"),
        (lambda: data.load_text_data(str(tmp_path / "missing.npy")), "does not exist"),
        (lambda: data.load_text_data(str(tmp_path)), "has no non-empty files"),
        (lambda: data.load_text_data(str(_touch(tmp_path / "empty.txt"))), "is empty"),
        (lambda: data.load_text_data(str(_touch(tmp_path / "empty.bin"))), "is empty"),
        (lambda: stdlib.check_seq_len(stdlib.valid.size), "is longer than the data"),
        (lambda: data.LMBatches(stdlib.valid[:50], 2, 50), "is longer than the data"),
        (lambda: data.load_text_data("stdlib", valid_fraction=1.5), "valid_fraction"),
    ]
    for fn, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            fn()
        assert "\n" not in str(info.value)
    stdlib.check_seq_len(256)      # fits: no error


def _touch(path: pathlib.Path) -> pathlib.Path:
    path.write_bytes(b"")
    return path
