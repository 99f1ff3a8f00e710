"""Test setup, applied before JAX initialises its backends.

* Eight forced CPU devices, so mesh tests run on any machine.
* The "rbg" PRNG: on CPU, XLA compiles every new shape of a threefry draw in
  seconds (about 7 s on a 2-core machine with jaxlib 0.10), which dominated the
  suite's time; no test depends on which generator draws its random numbers.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_DEFAULT_PRNG_IMPL", "rbg")
