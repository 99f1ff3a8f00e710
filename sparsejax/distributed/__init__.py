"""Training across processes: JAX's distributed runtime, a local launcher, and the outer loop
of DiLoCo / SparseLoCo (:mod:`sparsejax.distributed.local_sgd`)."""

from sparsejax.distributed.runtime import (DistributedError, check_same_settings, initialize,
                                           is_initialized)

__all__ = ["DistributedError", "check_same_settings", "initialize", "is_initialized"]
