"""Test setup, applied before JAX initialises its backends.

* Eight forced CPU devices, so mesh tests run on any machine; CPU code generated without
  LLVM's expensive optimisations (compiling, not running, is what tests spend time on).
* The "rbg" PRNG: on CPU, XLA compiles every new shape of a threefry draw in
  seconds (about 7 s on a 2-core machine with jaxlib 0.10), which dominated the
  suite's time; no test depends on which generator draws its random numbers.
* One XLA compilation cache per test run, in a fresh temporary folder removed at
  the end: the pytest-xdist workers and every process they start (train.py runs,
  notebook kernels, multi-process tests) inherit it, so a program that several of
  them compile (a train step, the tour's cells) compiles once per run. A train.py
  run on the tiny test model takes about a third of the CPU time with it warm. Every program
  goes in, however fast it compiled: the suite's thousands of small ones (eager ops, the
  tests' helpers, a train.py run's ~165 programs) were compiled again by each worker,
  train.py run and notebook kernel; cached, the suite takes about a tenth less CPU time.
  No run reads another run's executables.
"""

import os
import shutil
import tempfile

import pytest

# The programs here are tiny: compiling them (LLVM's optimisation of the CPU code) costs far
# more than running them, so the CPU backend generates code without its expensive passes
# (a third off a train.py/model/sparsify subset of the suite on 2 cores), and emits its
# fusions with the classic elemental emitter instead of the MLIR fusion emitters, whose
# per-fusion pipeline took about a third of each small program's compile time (jaxlib 0.10;
# every test passes with the same tolerances under it).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                      "--xla_cpu_use_fusion_emitters=false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_DEFAULT_PRNG_IMPL", "rbg")

# Set in the main pytest process before the workers start (they inherit the environment);
# a cache folder chosen by the caller is used as it is and never removed.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE = tempfile.mkdtemp(prefix="sparsejax-test-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def pytest_sessionfinish(session, exitstatus):
    # Only the process that made the folder removes it, after its workers are done.
    if _OWN_CACHE is not None and not hasattr(session.config, "workerinput"):
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture
def fresh_paths(monkeypatch):
    """No remembered path choices in or out of the test (memory, and no user cache file)."""
    from sparsejax.kernels import path_choice
    monkeypatch.delenv("SPARSEJAX_PATH_CACHE", raising=False)
    path_choice.clear_cache()
    yield
    path_choice.clear_cache()


# The slowest tests (each 7-30 s on 2 cores: train.py subprocesses, notebook kernels, multi-
# process runs) start first. pytest-xdist hands out tests in collection order, and
# tests/test_train.py comes late in it: a 30 s test started last kept one worker busy while
# the other had nothing left to run. Only the order changes; every test still runs.
_RUN_FIRST = (
    "tests/test_train.py::test_sigkill_and_resume_ends_bit_identical",
    "tests/test_notebooks.py::test_tour_notebook_executes_without_errors",
    "tests/test_distributed.py::test_two_processes_follow_the_one_process_curve",
    "tests/test_soups.py::test_train_py_runs_imp_with_soups",
    "tests/test_train.py::test_eight_devices_follow_the_one_device_curve",
    "tests/test_train.py::test_vision_model_trains",
)


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.nodeid.split("[")[0]
        return _RUN_FIRST.index(name) if name in _RUN_FIRST else len(_RUN_FIRST)
    items.sort(key=rank)   # stable: the rest keep their order
