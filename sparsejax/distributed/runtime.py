"""Joining a multi-process run: JAX's distributed runtime, started so that failures are clear.

    runtime.initialize("10.0.0.1:1234", num_processes=4, process_id=2, timeout_s=60)
    runtime.check_same_settings({"lr": 3e-3, ...})    # every process must agree

``initialize`` reads what it is not given from the environment (``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``: what :mod:`sparsejax.distributed.launch` sets) and
calls :func:`jax.distributed.initialize`. On CPU the processes talk through JAX's CPU
collectives (gloo over TCP); on GPUs through NCCL, which JAX picks itself.

Why the wrapping: when the coordinator cannot be reached, or not every process turns up,
XLA's coordination client aborts the process (SIGABRT and a C++ stack trace) once its
deadline passes. Here a process that cannot open a TCP connection to the coordinator fails
first with a one-line error, and a watchdog turns a join that does not complete within
``timeout_s`` into a one-line error and exit status 2, before XLA's own deadline.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import threading
import time
from typing import Any, Mapping

import jax

__all__ = ["DistributedError", "initialize", "is_initialized", "check_same_settings",
           "ENV_COORDINATOR", "ENV_NUM_PROCESSES", "ENV_PROCESS_ID"]

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
JOIN_FAILED_EXIT_CODE = 2


class DistributedError(RuntimeError):
    """A multi-process run cannot start (unreachable coordinator, processes that disagree)."""


def is_initialized() -> bool:
    if hasattr(jax.distributed, "is_initialized"):
        return jax.distributed.is_initialized()
    return _client() is not None


def _settings(coordinator_address: str, num_processes: int, process_id: int):
    address = coordinator_address or os.environ.get(ENV_COORDINATOR, "")
    if not address:
        if num_processes > 1:
            raise ValueError(f"--num_processes {num_processes} needs --coordinator_address host:port "
                             f"(the address of process 0), or {ENV_COORDINATOR} in the environment")
        return None
    n = num_processes if num_processes > 1 else int(os.environ.get(ENV_NUM_PROCESSES, num_processes))
    pid = process_id if process_id or ENV_PROCESS_ID not in os.environ else int(os.environ[ENV_PROCESS_ID])
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--coordinator_address {address!r}: write host:port, e.g. localhost:12345")
    if n < 1:
        raise ValueError(f"--num_processes {n} must be at least 1")
    if not 0 <= pid < n:
        raise ValueError(f"--process_id {pid} must be in [0, --num_processes={n})")
    return address, n, pid


def _wait_for_port(address: str, deadline: float) -> None:
    """Retries a TCP connection to the coordinator until it answers or the deadline passes."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    last = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, int(port)), timeout=1.0):
                return
        except OSError as e:
            last = e
            time.sleep(0.2)
    raise DistributedError(f"cannot reach the coordinator at {address} ({last}); start process 0 "
                           f"with the same --coordinator_address, or raise --distributed_timeout")


def _use_gloo_on_cpu() -> None:
    # gloo is JAX's default CPU collectives (0.10-0.12); say so explicitly where the option exists.
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, ValueError):   # an older or newer JAX without the option
        pass


def initialize(coordinator_address: str = "", num_processes: int = 1, process_id: int = 0, *,
               timeout_s: float = 60.0) -> bool:
    """Joins the run described by the arguments (or the environment); False if single-process.

    Must run before anything touches a JAX backend. Raises ``DistributedError`` when the
    coordinator cannot be reached within ``timeout_s``; exits with status 2 and a one-line
    message on stderr when the join itself does not complete in time (XLA would abort).
    """
    settings = _settings(coordinator_address, num_processes, process_id)
    if settings is None or settings[1] == 1:
        return False
    if is_initialized():
        return True
    address, n, pid = settings
    if timeout_s <= 0:
        raise ValueError(f"--distributed_timeout {timeout_s} must be positive (seconds)")
    deadline = time.monotonic() + timeout_s
    if pid != 0:
        _wait_for_port(address, deadline)
    _use_gloo_on_cpu()

    def give_up():
        sys.stderr.write(f"sparsejax: process {pid} of {n} could not join the run at {address} within "
                         f"{timeout_s:g} s: not every process reached the coordinator; start all "
                         f"{n} processes with the same --coordinator_address and --num_processes "
                         f"(and distinct --process_id), or raise --distributed_timeout\n")
        sys.stderr.flush()
        os._exit(JOIN_FAILED_EXIT_CODE)

    watchdog = threading.Timer(max(deadline - time.monotonic(), 0.5), give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        # XLA's own deadline comes after the watchdog, so the message above is what users see.
        jax.distributed.initialize(address, n, pid, initialization_timeout=int(timeout_s) + 30)
    finally:
        watchdog.cancel()
    return True


def _client():
    # The coordinator's key-value store has no public handle in JAX 0.10-0.12.
    from jax._src import distributed as _distributed
    return _distributed.global_state.client


def check_same_settings(settings: Mapping[str, Any], *, name: str = "settings",
                        timeout_s: float = 60.0) -> None:
    """Refuses to start unless every process passed the same ``settings`` (a JSON-able dict).

    Each process publishes its settings in the coordinator's key-value store and compares
    them with process 0's; a process that differs raises a one-line ``DistributedError``
    naming the first differing keys. A no-op in a single-process run.
    """
    if jax.process_count() == 1:
        return
    client, pid = _client(), jax.process_index()
    text = json.dumps(dict(settings), sort_keys=True, default=str)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    key = f"sparsejax/{name}"
    if pid == 0:
        client.key_value_set(key, text)
    reference = client.blocking_key_value_get(key, int(timeout_s * 1000))
    # Everyone reports whether they agree before anyone raises, so no process is left waiting.
    client.key_value_set(f"{key}/agree/{pid}", "1" if reference == text else digest)
    verdicts = [client.blocking_key_value_get(f"{key}/agree/{i}", int(timeout_s * 1000))
                for i in range(jax.process_count())]
    if reference != text:
        ours, theirs = json.loads(text), json.loads(reference)
        diffs = [f"--{k}={ours.get(k)!r} here, {theirs.get(k)!r} on process 0"
                 for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]
        raise DistributedError(f"process {pid} was started with other {name} than process 0 "
                               f"({'; '.join(diffs[:3])}); start every process with the same flags")
    disagree = [i for i, v in enumerate(verdicts) if v != "1"]
    if disagree:
        raise DistributedError(f"processes {disagree} were started with other {name} than process 0; "
                               f"start every process with the same flags")
