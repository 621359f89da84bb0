"""Host arrays reach the device through server/transfer.py: staged in page-locked memory and copied
without blocking, so building a step's inputs never waits for the GPU (issue 9: one host sync per
step, the sampled tokens). The copy itself needs a GPU to be seen (bench/gpu_check.py counts a
step's syncs); here, its CPU behaviour, and a scan that keeps pageable copies out of the step."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from server.transfer import copy_into, indices, to_device

ROOT = Path(__file__).resolve().parents[2]
# the modules that build and run a step
STEP_MODULES = [
    "server/engine/sampler.py",
    "server/engine/model_runner.py",
    "server/engine/step_inputs.py",
    "server/engine/attn_flex.py",
    "server/engine/attention.py",
    "server/engine/graphs.py",
    "server/engine/grammar.py",
    "server/lora/ops.py",
    "server/lora/segments.py",
    "server/lora/layer.py",
    "server/lora/fused.py",
]
PAGEABLE = [
    re.compile(r"torch\.(tensor|as_tensor)\([^\n]*device="),  # built on the host, copied blocking
    re.compile(r"from_numpy\([^\n]*\)\.to\("),
    re.compile(r"\.copy_\(torch\.(from_numpy|tensor)\("),
]


def test_host_arrays_on_the_cpu_are_views_and_copies() -> None:
    a = np.arange(6, dtype=np.int32)
    t = to_device(a, torch.device("cpu"))
    assert t.dtype == torch.int32 and t.tolist() == a.tolist()
    a[0] = 7
    assert t[0] == 7  # a view, as before: no copy on the CPU
    dst = torch.zeros(6, dtype=torch.int32)
    copy_into(dst, a[::-1])  # a strided array is made contiguous first
    assert dst.tolist() == a[::-1].tolist()
    ids = indices([3, 0, 3], torch.device("cpu"))
    assert ids.dtype == torch.int64 and ids.tolist() == [3, 0, 3]


@pytest.mark.parametrize("module", STEP_MODULES)
def test_the_step_copies_nothing_from_pageable_memory(module: str) -> None:
    source = (ROOT / module).read_text()
    hits = [
        f"{module}:{source[: m.start()].count(chr(10)) + 1}: {m.group(0)}"
        for pattern in PAGEABLE
        for m in pattern.finditer(source)
    ]
    assert not hits, "use server.transfer.to_device / copy_into:\n" + "\n".join(hits)
