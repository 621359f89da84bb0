"""use_one_torch_thread: a helper thread on one torch thread leaves every other thread's count, also
across another thread's first call into the cpp kernel (a C++ extension's own lazy init). Each
test runs with 2+ threads (`several_threads`): with one, a lost count would not show."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import torch

from server.lora.backends import cpp_lora
from server.torch_threads import use_one_torch_thread


def _in_thread(fn: Callable[[], int]) -> int:
    out: list[int] = []
    worker = threading.Thread(target=lambda: out.append(fn()))
    worker.start()
    worker.join()
    return out[0]


def _helper() -> int:
    use_one_torch_thread()
    torch.ones(1 << 16).sum()  # a parallel op: a thread that re-adopted the default would show it
    return torch.get_num_threads()


def _kernel_first() -> int:
    """A thread whose first parallel op is the cpp kernel's at::parallel_for (the engine thread's
    first adapter step)."""
    A = torch.ones(2, 8, 4).transpose(1, 2)  # [S, R, in] stored rank-innermost
    B, scale, rank = torch.ones(2, 4, 8), torch.ones(2), torch.tensor([0, 4], dtype=torch.int32)
    y, x = torch.zeros(4, 8), torch.ones(4, 8)
    cpp_lora.lora_add_(y, x, A, B, scale, rank, None, torch.ones(4, dtype=torch.long))
    assert torch.equal(y, torch.full((4, 8), 32.0))
    return torch.get_num_threads()


def test_a_helper_thread_keeps_its_one_thread_to_itself(several_threads: int) -> None:
    threads = several_threads
    assert _in_thread(_helper) == 1
    assert torch.get_num_threads() == threads
    assert _in_thread(torch.get_num_threads) == threads  # a thread started later


@pytest.mark.skipif(not cpp_lora.load(), reason=f"cpp backend not built: {cpp_lora.error()}")
def test_a_first_cpp_kernel_call_keeps_the_threads_count(several_threads: int) -> None:
    threads = several_threads
    assert _in_thread(_helper) == 1
    assert _in_thread(_kernel_first) == threads
    assert torch.get_num_threads() == threads
