"""Starts N local processes of one command as a JAX multi-process run (for tests and CPU runs).

    python -m sparsejax.distributed.launch --num_processes=2 -- python train.py --mesh=data:-1
    python -m sparsejax.distributed.launch -n 4 --devices_per_process=1 --logdir=logs -- python ...

Each process gets ``JAX_COORDINATOR_ADDRESS`` (localhost and a free port),
``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` in its environment, which
:func:`sparsejax.distributed.runtime.initialize` (and so train.py) reads. With
``--devices_per_process`` each process sees that many CPU devices
(``--xla_force_host_platform_device_count``). Process 0 prints to this terminal; the
others write to ``<logdir>/process_<i>.log`` (without ``--logdir``, the end of a failed one's
output is shown). If
one process fails, the others are stopped and its exit status is returned.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Sequence

from sparsejax.distributed.runtime import ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID

__all__ = ["free_port", "launch", "main"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(base: dict, address: str, n: int, i: int, devices_per_process: int | None) -> dict:
    env = {**base, ENV_COORDINATOR: address, ENV_NUM_PROCESSES: str(n), ENV_PROCESS_ID: str(i)}
    if devices_per_process:
        flags = [f for f in env.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
        env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices_per_process}"])
        env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def launch(command: Sequence[str], num_processes: int, *, devices_per_process: int | None = None,
           logdir: str | None = None, timeout_s: float | None = None, env: dict | None = None,
           capture: bool = False) -> tuple[int, list[str]]:
    """Runs ``command`` as ``num_processes`` cooperating processes; returns (status, outputs).

    ``outputs`` holds each process's combined stdout/stderr when ``capture`` (else ""). The
    status is 0 when all succeed, else the first failure's (124 when ``timeout_s`` passes).
    """
    if num_processes < 1:
        raise ValueError(f"--num_processes {num_processes} must be at least 1")
    if not command:
        raise ValueError("no command to launch: put it after --, e.g. -- python train.py")
    address = f"localhost:{free_port()}"
    base = dict(os.environ if env is None else env)
    if logdir:
        os.makedirs(logdir, exist_ok=True)
    procs, files = [], []
    for i in range(num_processes):
        if capture:
            out, err = tempfile.TemporaryFile("w+"), subprocess.STDOUT
        elif i == 0:
            out, err = None, None
        elif logdir:
            out, err = open(os.path.join(logdir, f"process_{i}.log"), "w+"), subprocess.STDOUT
        else:   # the others would repeat process 0's progress: kept aside, shown if they fail
            out, err = tempfile.TemporaryFile("w+"), subprocess.STDOUT
        files.append(out)
        procs.append(subprocess.Popen(list(command), stdout=out, stderr=err,
                                      env=_env(base, address, num_processes, i, devices_per_process)))
    status, deadline = 0, None if timeout_s is None else time.monotonic() + timeout_s
    try:
        running = set(range(num_processes))
        while running:
            for i in sorted(running):
                rc = procs[i].poll()
                if rc is None:
                    continue
                running.discard(i)
                if rc != 0 and status == 0:
                    status = rc
                    _stop(procs, running)
            if deadline is not None and time.monotonic() > deadline and running:
                status = status or 124
                _stop(procs, running)
            time.sleep(0.05)
    finally:
        _stop(procs, {i for i, p in enumerate(procs) if p.poll() is None})
    outputs = []
    for i, f in enumerate(files):
        text = ""
        if f is not None:
            f.seek(0)
            text = f.read() if (capture or not logdir) else ""
            f.close()
        if not capture and text and procs[i].returncode not in (0, None):
            sys.stderr.write(f"--- process {i} exited with {procs[i].returncode}; its last output:\n"
                             + "\n".join(text.splitlines()[-20:]) + "\n")
        outputs.append(text if capture else "")
    return status, outputs


def _stop(procs, which) -> None:
    """Terminates the processes this launcher started (by their own handles), then kills."""
    for i in which:
        if procs[i].poll() is None:
            procs[i].terminate()
    for i in which:
        try:
            procs[i].wait(timeout=10)
        except subprocess.TimeoutExpired:
            procs[i].kill()
            procs[i].wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", "--num_processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=None,
                        help="CPU devices each process sees (sets XLA_FLAGS and JAX_PLATFORMS=cpu)")
    parser.add_argument("--logdir", default=None, help="where processes 1.. write their output")
    parser.add_argument("--timeout_s", type=float, default=None)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        status, _ = launch(command, args.num_processes, devices_per_process=args.devices_per_process,
                           logdir=args.logdir, timeout_s=args.timeout_s)
    except ValueError as e:
        sys.exit(f"launch: {e}")
    return status if status >= 0 else 128 - status   # killed by signal n: 128 + n, as shells report


if __name__ == "__main__":
    sys.exit(main())
