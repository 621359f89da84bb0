from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The Triton kernels run in Triton's interpreter on CPU tensors. Triton reads this when it is first
# imported, and bitsandbytes and peft import it as soon as they load (the e2e modules, collected
# first), so it is set here, before any test module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (`make test` runs TEST_WORKERS processes) each worker, and every server or
# subprocess it starts, gets its share of the cores. Left at one OpenMP thread per core each, two
# workers and their servers put four to eight spinning threads on two cores: the unit tests took
# 466 s instead of 258, the end-to-end tests 1543 s instead of 783, one PEFT oracle 4x its time.
# A thread count the caller set is kept.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
CORES = len(os.sched_getaffinity(0))
if WORKERS > 1 and "OMP_NUM_THREADS" not in os.environ:
    share = str(max(1, CORES // WORKERS))
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = share
    torch.set_num_threads(int(share))

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture
def several_threads() -> Iterator[int]:
    """Two torch threads or more (the process default too) for a test of how thread counts are kept:
    a pytest-xdist worker's share of a two-core machine is one thread, where such a test shows
    nothing."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(2, before))
    yield torch.get_num_threads()
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
