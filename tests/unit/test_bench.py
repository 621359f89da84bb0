"""The benchmark scripts' shared pieces: they import, their adapters are what PEFT itself loads, and
the report helpers compute what they claim."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch

from bench import report
from bench.adapters import write_adapter
from server.lora.weights import linear_modules, load_adapter

SCRIPTS = ("step_overhead", "throughput", "http_e2e", "churn", "scaling", "structured")


@pytest.mark.parametrize("name", SCRIPTS)
def test_scripts_import_and_have_a_main(name: str) -> None:
    module = importlib.import_module(f"bench.{name}")
    assert callable(module.main)


def test_random_adapter_loads_in_peft_and_in_loraplex(tiny_checkpoint, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path = tiny_checkpoint("llama")
    shapes = linear_modules(AutoModelForCausalLM.from_pretrained(path))
    out = write_adapter(tmp_path / "a", shapes, rank=4, seed=1, targets=("q_proj", "down_proj"))
    ours = load_adapter(out, shapes, max_rank=16)
    assert ours.max_rank == 4
    assert {n.rsplit(".", 1)[-1] for n in ours.modules} == {"q_proj", "down_proj"}

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), str(out))
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(loaded) == 2 * len(ours.modules)
    module = next(iter(ours.modules))
    peft_a = next(v for k, v in loaded.items() if f"{module}.lora_A" in k)
    assert torch.equal(peft_a, ours.modules[module].A)  # the same numbers reach both
    assert json.loads((out / "adapter_config.json").read_text())["lora_alpha"] == 8


def test_percentile_and_table(capsys: pytest.CaptureFixture[str]) -> None:
    values = [float(v) for v in range(1, 101)]
    assert report.percentile(values, 50) == 50.0
    assert report.percentile(values, 95) == 95.0
    assert report.percentile([3.0], 99) == 3.0
    text = report.table("t", ["a", "ratio"], [["x", 1.234], ["longer", 10.0]])
    assert text.splitlines()[2].split() == ["x", "1.23"]
    assert "10.00" in capsys.readouterr().out


GPU_MACHINE_LACKS = ("pydantic", "pydantic_settings", "fastapi", "uvicorn", "gguf", "multipart")


def test_gpu_check_imports_nothing_the_gpu_machine_lacks() -> None:
    """The lent GPU machine has torch, triton, transformers and peft but none of the HTTP stack: the
    engine, the backends and the check itself must import without it."""
    import subprocess
    import sys

    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        f"        if name.split('.')[0] in {GPU_MACHINE_LACKS!r}: raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import bench.gpu_check, bench.gpu_models, bench.adapters, server.engine.engine\n"
        "import server.engine.backends, server.model.loader, server.lora.registry, tests.peft_factory\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


@pytest.mark.slow
def test_gpu_check_smoke_kernels(tmp_path: Path) -> None:
    """The GPU check's probe and kernel phases, rehearsed on tiny shapes on the CPU: the tiled base
    matmul and every LoRA path are row-invariant, the plain matmul is the control that is not."""
    import json
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-m",
        "bench.gpu_check",
        "--smoke",
        "--phases",
        "probe,kernels",
        "--out",
        str(tmp_path),
    ]
    subprocess.run(cmd, check=True, cwd=Path(__file__).resolve().parents[2], capture_output=True)
    kernels = json.loads((tmp_path / "gpu_check.json").read_text())["kernels"]
    entry = kernels["64x128"]
    for key in ("torch_rows_invariant", "triton_fp32_invariant", "tiled_matmul_invariant"):
        assert all(entry[key].values()), key
    assert entry["triton_fp32_rel_err"] < 1e-5
    assert kernels["flex_decode"]["row_alone_equals_batched"]
