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

SCRIPTS = (
    "step_overhead",
    "peft_methods",
    "throughput",
    "http_e2e",
    "churn",
    "scaling",
    "structured",
    "soak",
    "host_step",
    "single_stream",
    "base_matmul",
    "kernel_isa",
)


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


METRICS = """# HELP vllm:num_requests_running Requests in the running batch.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="SmolLM2-135M-Instruct"} 3.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="SmolLM2-135M-Instruct"} 0.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{model_name="SmolLM2-135M-Instruct"} 0.125
# TYPE loraplex:adapters_registered gauge
loraplex:adapters_registered 16.0
"""


def test_soak_reads_the_engine_gauges_from_metrics() -> None:
    from bench.sampler import engine_gauges

    assert engine_gauges(METRICS) == {"running": 3.0, "waiting": 0.0, "kv_usage": 0.125}
    without_kv = "\n".join(line for line in METRICS.splitlines() if "kv_cache" not in line)
    with pytest.raises(ValueError, match="kv_cache_usage_perc"):
        engine_gauges(without_kv)  # a renamed metric must fail the soak, not read as 0


def test_soak_rss_drift_is_measured_after_warm_up() -> None:
    from bench.sampler import rss_drift

    mib = 2**20
    samples = [
        (0.0, 100 * mib),
        (10.0, 900 * mib),
        (30.0, 1000 * mib),
        (45.0, 1100 * mib),
        (60.0, 1040 * mib),
    ]
    samples.append((70.0, 5000 * mib))  # after the load ended: not part of the figure
    drift = rss_drift(samples, warmup_s=30.0, end_s=60.0)
    assert (drift["warm_mib"], drift["end_mib"], drift["peak_mib"]) == (1000.0, 1040.0, 1100.0)
    assert drift["drift_pct"] == pytest.approx(4.0)
    with pytest.raises(ValueError, match="fewer than 2"):
        rss_drift(samples, warmup_s=50.0, end_s=60.0)


def _soak_result(**changes: object) -> dict[str, object]:
    result: dict[str, object] = {
        "unexpected_errors": 0,
        "health": {"failures": 0},
        "rss": {"drift_pct": 1.0},
        "final_metrics": {"running": 0.0, "waiting": 0.0, "kv_usage": 0.0},
        "requests": {"completed": 10, "disconnects": 1, "uploads": 2, "replaces": 2, "deletes": 2},
        "server_exit": 0,
    }
    return {**result, **changes}


def test_soak_goals() -> None:
    from bench.soak import missed_goals

    assert missed_goals(_soak_result()) == []
    assert missed_goals(_soak_result(unexpected_errors=2)) == ["2 unexpected errors (goal 0)"]
    assert missed_goals(_soak_result(health={"failures": 1})) == ["1 /health failures (goal 0)"]
    assert "RSS drift 5.00%" in missed_goals(_soak_result(rss={"drift_pct": 5.0}))[0]
    stuck = _soak_result(final_metrics={"running": 1.0, "waiting": 0.0, "kv_usage": 0.01})
    assert missed_goals(stuck) == ["/metrics after the load: {'running': 1.0, 'kv_usage': 0.01} (goal all 0)"]
    idle = _soak_result(
        requests={"completed": 0, "disconnects": 0, "uploads": 1, "replaces": 1, "deletes": 1}
    )
    assert len(missed_goals(idle)) == 2  # a run that did nothing does not pass
    assert "exited with 3" in missed_goals(_soak_result(server_exit=3))[0]


def test_locust_report_is_read_by_name(tmp_path: Path) -> None:
    from bench.loadgen import read_report

    entry = {"method": "POST", "requests": 5, "failures": 1, "average_ms": 2.5, "max_ms": 9.0}
    entry["percentiles_ms"] = {"p50": 2.0, "p95": 9.0, "p99": 9.0}
    failure = {"name": "chat", "error": "HTTP 500", "occurrences": 1}
    path = tmp_path / "locust.json"
    path.write_text(json.dumps({"entries": {"chat": entry}, "failures": [failure], "samples": [{"ttft": 1}]}))
    entries, failures, samples = read_report(path)
    assert (entries["chat"].requests, entries["chat"].failures, entries["chat"].percentiles_ms["p95"]) == (
        5,
        1,
        9.0,
    )
    assert failures == [failure] and samples == [{"ttft": 1}]


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
    assert entry["us_m64_triton_fp32_kernel"] > 0 and entry["us_m64_triton_fast_kernel"] > 0
    for groups in ("9_3", "32_8"):  # SmolLM2's head groups, and Llama-3's power-of-two ones
        assert kernels[f"flex_decode_{groups}"]["row_alone_equals_batched"], groups


@pytest.mark.slow
def test_gpu_check_smoke_methods(tmp_path: Path) -> None:
    """The GPU check's methods phase rehearsed on the CPU (tiny shapes, batch-invariant mode): every
    method beyond LoRA gives the same bits solo and in one mixed batch, and PEFT's tokens."""
    import json
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "bench.gpu_check", "--smoke", "--phases", "methods", "--out", str(tmp_path)]
    subprocess.run(cmd, check=True, cwd=Path(__file__).resolve().parents[2], capture_output=True)
    methods = json.loads((tmp_path / "gpu_check.json").read_text())["methods"]
    mode = methods["batch_invariant"]
    assert mode["solo_eq_mixed_tokens"] == mode["solo_eq_mixed_logits_bitwise"] == mode["requests"] == 16
    assert mode["differs_from_base"] >= 10  # each method changes the output of the random model
    refs = methods["vs_peft (batch_invariant)"]
    assert len(refs) == 14 and set(refs.values()) == {"identical"}, refs
