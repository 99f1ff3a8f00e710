"""A corrupt chunk in the newest checkpoint: one warning, the previous step, no flood on stderr."""

import pathlib
import subprocess
import sys
import textwrap

import jax.numpy as jnp

from sparsejax.training import checkpointing

ROOT = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import sys
    import jax.numpy as jnp
    from sparsejax.training import checkpointing
    directory = sys.argv[1]
    # many leaves: each pending read of the abandoned restore used to print a traceback
    state = {f"w{i}": jnp.full((4, 4), float(i)) for i in range(100)}
    with checkpointing.Checkpointer(directory, max_to_keep=3) as ckpt:
        restored = ckpt.restore(state)
        assert restored.step == 1 and float(restored.state["w7"][0, 0]) == 7.0
    print("restored step", restored.step)
""")


def _run(*args):
    return subprocess.run([sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env={"JAX_PLATFORMS": "cpu",
                                                      "PYTHONPATH": str(ROOT),
                                                      "PATH": "/usr/bin:/bin"})


def test_corrupt_chunk_gives_one_warning_and_no_event_loop_tracebacks(tmp_path):
    state = {f"w{i}": jnp.full((4, 4), float(i)) for i in range(100)}
    with checkpointing.Checkpointer(tmp_path, max_to_keep=3) as ckpt:
        ckpt.save(1, state)
        ckpt.save(2, state)
    chunks = [f for f in (tmp_path / "2").rglob("*") if f.is_file() and "/d/" in f.as_posix()]
    assert chunks
    for f in chunks:
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
    out = _run(str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "restored step 1" in out.stdout
    assert out.stderr.count("RuntimeWarning: checkpoint step 2") == 1, out.stderr[-2000:]
    assert "Event loop is closed" not in out.stderr, out.stderr[:1000]
