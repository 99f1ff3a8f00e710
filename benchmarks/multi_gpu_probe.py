"""Where the time of a data-parallel train.py step goes on several GPUs.

    python benchmarks/multi_gpu_probe.py                 # all variants, one table
    python benchmarks/multi_gpu_probe.py --variant=NAME  # one variant (a subprocess of the above)

Measures, on the machine's GPUs: how they are connected (``nvidia-smi topo -m``), the
all-reduce bandwidth JAX gets for a gradient-sized buffer (float32 and bfloat16), the
collectives the compiled data-parallel step contains (count, dtype, bytes), and the time
of the jitted step alone (batches already on the devices, no host work in the loop) for
one GPU and for all GPUs under several XLA flag sets. ``PROBE_PROFILE=1`` also traces a few
steps with ``jax.profiler`` and sums the device kernel time per kind of work
(``step_profile.py``'s categories); ``PROBE_VARIANTS=mesh@flags;...`` picks the variants. The step time of one GPU over the
number of GPUs, plus the measured all-reduce time, is what the data-parallel step
should cost if nothing overlaps; the gap to the measured step says what overlapped, or
what else costs. Prints the table last and writes it to $OUT/multi_gpu_probe.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import time

FLAG_SETS = {
    "default": "",
    "lhs": "--xla_gpu_enable_latency_hiding_scheduler=true",
    "lhs_combine32M": ("--xla_gpu_enable_latency_hiding_scheduler=true "
                       "--xla_gpu_all_reduce_combine_threshold_bytes=33554432"),
}
CONFIG = dict(model="lm", d_model=1024, n_layers=8, n_heads=16, d_ff=4096, seq_len=512,
              batch_size=64, steps=1000, dtype="bfloat16", learning_rate=1e-3, recipe="dense")


if os.environ.get("PROBE_SMOKE"):   # a CPU check of the script itself, tiny sizes
    CONFIG.update(d_model=32, n_layers=1, n_heads=2, d_ff=64, seq_len=16, batch_size=4, dtype="float32")


def _step_time(mesh_spec: str, steps: int = 12, **overrides) -> dict:
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    sys.path.append(str(pathlib.Path(__file__).resolve().parents[1]))
    import train

    import tempfile
    with tempfile.TemporaryDirectory() as workdir:
        run = train.prepare(train.Config(**{**CONFIG, **overrides}, mesh=mesh_spec, workdir=workdir))
        state, sfn, tx = train.create_state(run)
    mesh = run.mesh
    state_sharding = jax.tree.map(lambda x: train.fsdp_sharding(mesh, x), state)
    batch_sharding = NamedSharding(mesh, P(("data", "fsdp")))
    state = jax.device_put(jax.tree.map(lambda x: x.copy(), state), state_sharding)

    # train.py's own step, bound to this run's model and optimizer.
    step = functools.partial(train.train_step, sfn=sfn, tx=tx,
                             param_sharding=train.compute_sharding(mesh))
    jstep = jax.jit(step, in_shardings=(state_sharding, batch_sharding),
                    out_shardings=(state_sharding, None), donate_argnums=0)
    batches = [jax.device_put(run.train_batches.batch(i), batch_sharding) for i in range(4)]
    compiled = jstep.lower(state, batches[0]).compile()
    hlo = compiled.as_text()
    collectives = {}
    for line in hlo.splitlines():
        m = re.search(r"= (.*?) (all-reduce|reduce-scatter|all-gather)(-start)?\(", line)
        if not m:
            continue
        for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1)):
            size = 1
            for d in filter(None, dims.split(",")):
                size *= int(d)
            c = collectives.setdefault(f"{m.group(2)} {dtype}", [0, 0])
            c[0] += 1
            c[1] += size * {"f32": 4, "bf16": 2, "f16": 2, "s32": 4}.get(dtype, 4)
    for _ in range(3):
        state, metrics = jstep(state, batches[0])
    jax.block_until_ready(metrics)
    times = []
    for r in range(5):
        t0 = time.perf_counter()
        for i in range(steps):
            state, metrics = jstep(state, batches[i % len(batches)])
        jax.block_until_ready(metrics)
        times.append((time.perf_counter() - t0) / steps)
    result = {"step_ms": 1e3 * statistics.median(times), "collectives": collectives,
              "tokens_per_s": run.cfg.batch_size * CONFIG["seq_len"] / statistics.median(times)}
    if os.environ.get("PROBE_PROFILE"):       # device kernel time per kind of work, per step
        result["profile"] = _profile(jstep, state, batches, steps=3)
    return result


def _profile(jstep, state, batches, steps: int) -> dict:
    """Per-step device kernel µs by category (``step_profile.py``'s), and the slowest kernels."""
    sys.path.append(str(pathlib.Path(__file__).resolve().parent))
    from step_profile import summarise, top_line, trace

    carry = [state, 0]          # the step donates its state: each call takes the last one's

    def step():
        carry[0], metrics = jstep(carry[0], batches[carry[1] % len(batches)])
        carry[1] += 1
        return metrics

    summary = summarise(trace(step, steps, warmup=0), top=10)
    return {"categories": summary["categories"],
            "top": [top_line(t, width=50) for t in summary["top"]]}


def _allreduce_gbps() -> dict:
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    n = jax.device_count()
    mesh = Mesh(jax.devices(), ("d",))
    out = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        elems = 2 ** 10 if os.environ.get("PROBE_SMOKE") else 100 * 2 ** 20         # ~ the LM's gradient: 100M values per device
        x = jax.device_put(jnp.ones((n, elems), dtype), NamedSharding(mesh, P("d")))
        f = jax.jit(lambda x: jnp.sum(x, axis=0), out_shardings=NamedSharding(mesh, P()))
        jax.block_until_ready(f(x))
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            jax.block_until_ready(f(x))
            times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        nbytes = elems * jnp.dtype(dtype).itemsize
        # bus bandwidth of a ring all-reduce: 2 (n - 1) / n of the buffer crosses each link
        out[jnp.dtype(dtype).name] = {"ms": 1e3 * t, "busbw_GBps": 2 * (n - 1) / n * nbytes / t / 1e9}
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", default="")
    args = parser.parse_args()
    if args.variant:
        mesh_spec, _, flagset = args.variant.partition("@")
        mesh_spec, _, extra = mesh_spec.partition("+")
        overrides = {"half": {"batch_size": CONFIG["batch_size"] // 2},
                     "scan": {"scan_layers": True}}.get(extra, {})
        result = _step_time(mesh_spec, **overrides)
        if not mesh_spec.startswith("data:1"):
            result["allreduce"] = _allreduce_gbps()
        print("RESULT " + json.dumps(result))
        return

    try:
        topo = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True).stdout
    except OSError as e:
        topo = f"nvidia-smi: {e}"
    print(topo)
    rows = {}
    base_env = dict(os.environ)
    # data:1+half: one GPU with half the global batch, i.e. one data-parallel replica's own work;
    # +scan: the layers as one nn.scan (one compiled block; collectives inside the loop).
    variants = ([("data:1", "default"), ("data:1+half", "default")] + [("data:2", f) for f in FLAG_SETS]
                + [("data:1,fsdp:2", "default"), ("data:1+scan", "default"), ("data:2+scan", "default")])
    if os.environ.get("PROBE_VARIANTS"):
        # mesh@flags entries, separated by ";" (or "," when no mesh spec has one of its own).
        spec = os.environ["PROBE_VARIANTS"]
        variants = [tuple(v.split("@")) for v in spec.split(";" if ";" in spec else ",")]
    for mesh_spec, flagset in variants:
        env = dict(base_env)
        env["XLA_FLAGS"] = (base_env.get("XLA_FLAGS", "") + " " + FLAG_SETS[flagset]).strip()
        t0 = time.time()
        proc = subprocess.run([sys.executable, __file__, f"--variant={mesh_spec}@{flagset}"],
                              env=env, capture_output=True, text=True, timeout=240)
        line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if not line:
            print(f"{mesh_spec}@{flagset} failed:\n{proc.stderr[-3000:]}")
            continue
        rows[(mesh_spec, flagset)] = json.loads(line[0][7:])
        print(mesh_spec, flagset, f"{time.time() - t0:.0f}s", rows[(mesh_spec, flagset)], flush=True)
    import jax
    one = rows.get(("data:1", "default"))
    lines = [f"## multi-GPU step probe: {jax.device_count()}× {jax.devices()[0].device_kind}, "
             f"JAX {jax.__version__}", "", "Command: `python benchmarks/multi_gpu_probe.py`", "",
             "LM d_model 1024, 8 layers, d_ff 4096, global batch 64×512 tokens, bf16, dense, "
             "AdamW; jitted step alone (batches on device).", "",
             "| mesh | XLA flags | step ms | tokens/s | vs 1 GPU | collectives (count, MB) |",
             "|---|---|---|---|---|---|"]
    for (mesh_spec, flagset), r in rows.items():
        coll = "; ".join(f"{k}: {v[0]}, {v[1] / 2**20:.0f}" for k, v in r["collectives"].items()) or "-"
        speed = f"{r['tokens_per_s'] / one['tokens_per_s']:.2f}×" if one else "-"
        lines.append(f"| {mesh_spec} | {flagset} | {r['step_ms']:.1f} | {r['tokens_per_s']:.0f} | "
                     f"{speed} | {coll} |")
    profiled = [(k, r["profile"]) for k, r in rows.items() if "profile" in r]
    if profiled:          # kernel µs per step (summed over the devices' streams)
        cats = sorted({c for _, p in profiled for c in p["categories"]})
        lines += ["", "Device kernel time per step, µs (all GPUs' streams summed):", "",
                  "| mesh | XLA flags | " + " | ".join(cats) + " |", "|---|---|" + "---|" * len(cats)]
        for (mesh_spec, flagset), p in profiled:
            lines.append(f"| {mesh_spec} | {flagset} | "
                         + " | ".join(f"{p['categories'].get(c, 0.0):.0f}" for c in cats) + " |")
        lines += ["", "Slowest kernels per step (µs):", ""]
        lines += [f"- {m}@{f}: " + "; ".join(p["top"]) for (m, f), p in profiled]
    ar = next((r["allreduce"] for r in rows.values() if "allreduce" in r), None)
    if ar:
        lines.append("")
        lines.append("All-reduce of 100M values per device: " + ", ".join(
            f"{k} {v['ms']:.1f} ms ({v['busbw_GBps']:.0f} GB/s bus bandwidth)" for k, v in ar.items()))
    text = "\n".join(lines) + "\n"
    if os.environ.get("OUT"):
        pathlib.Path(os.environ["OUT"], "multi_gpu_probe.md").write_text(topo + "\n" + text)
    print(text)


if __name__ == "__main__":
    main()
