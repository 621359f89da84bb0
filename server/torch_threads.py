"""Torch's CPU thread count per thread, without touching the one every other thread adopts.

`torch.set_num_threads` sets the calling thread's count and also the process default that a thread
adopts at its first parallel op, including, again, at its first call into any C++ extension built
with at::parallel_for (the header's lazy init keeps one "initialized" flag per shared object and
thread). A helper thread that set itself to one thread therefore set the engine thread to one
thread at its first cpp-kernel call: every later step 1.5x slower, and on CPUs whose GEMM path
depends on the thread count, other bits (base_gemm.tile_keeps_rows is keyed by it).
"""

from __future__ import annotations

import logging
import threading

import torch

log = logging.getLogger(__name__)


def use_one_torch_thread() -> None:
    """This thread's torch ops run on one thread (a helper beside the engine: a second OpenMP pool
    would slow every engine step); the process default stays what it was."""
    default = torch.get_num_threads()  # also this thread's lazy init, so it will not re-adopt it
    torch.set_num_threads(1)
    # only set_num_threads writes the default, and it sets its caller's count too: a throwaway
    # thread puts the default back
    restore = threading.Thread(target=torch.set_num_threads, args=(default,), name="torch-threads")
    restore.start()
    restore.join()


class KeptThreadCount:
    """The torch thread count a thread was given, put back (with one warning) wherever something
    else in the process changed it: the engine's steps are checked, since a lost thread costs every
    later step 1.5x on CPU and may change its GEMMs' bits. Construct it on the thread whose count it
    keeps, or on one with the same count (the process default)."""

    def __init__(self) -> None:
        self.threads = torch.get_num_threads()
        self.resets = 0

    def keep(self) -> None:
        now = torch.get_num_threads()
        if now == self.threads:
            return
        if not self.resets:
            log.warning(
                "torch's thread count on the engine thread changed from %d to %d (something in the "
                "process reset it); set back to %d",
                self.threads,
                now,
                self.threads,
            )
        self.resets += 1
        torch.set_num_threads(self.threads)
