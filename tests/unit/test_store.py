"""The adapter store: content-addressed, atomic, restart-safe."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from server.errors import AdapterError, AdapterNotFoundError
from server.lora.adapter import LinearShape
from server.lora.registry import AdapterRegistry
from server.lora.store import AdapterStore
from server.lora.weights import linear_modules
from tests.peft_factory import make_adapter


@pytest.fixture(scope="module")
def adapters(
    tiny_checkpoint: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    from transformers import AutoModelForCausalLM

    path = tiny_checkpoint("llama")
    root = tmp_path_factory.mktemp("src")
    return {
        name: make_adapter(
            lambda: AutoModelForCausalLM.from_pretrained(path),
            root / name,
            seed=i,
            r=r,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj"],
        )
        for i, (name, r) in enumerate({"a": 2, "b": 4}.items())
    }


@pytest.fixture(scope="module")
def shapes(tiny_checkpoint: Callable[[str], Path]) -> dict[str, LinearShape]:
    from transformers import AutoModelForCausalLM

    return dict(linear_modules(AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama"))))


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))
    }


def test_store_round_trip_and_restart(
    tmp_path: Path, adapters: dict[str, Path], shapes: dict[str, LinearShape]
) -> None:
    reg = AdapterRegistry(shapes, 8, AdapterStore(tmp_path))
    rec_a, _ = reg.add_dir("a", adapters["a"])
    rec_b, _ = reg.add_dir("b", adapters["b"])
    assert rec_a.path == tmp_path / "blobs" / rec_a.version
    assert (rec_a.path / "adapter_model.safetensors").read_bytes() == (
        adapters["a"] / "adapter_model.safetensors"
    ).read_bytes()
    assert json.loads((tmp_path / "names.json").read_text()) == {"a": rec_a.version, "b": rec_b.version}

    same, _ = reg.add_dir("a2", adapters["a"])  # same bytes, second name: one blob
    assert same.version == rec_a.version and len(list((tmp_path / "blobs").iterdir())) == 2

    reg.remove("b")
    with pytest.raises(AdapterNotFoundError):
        reg.resolve("b")
    assert (tmp_path / "blobs" / rec_b.version).is_dir(), "running requests may still read it until restart"

    (tmp_path / "staging" / "crashed-upload").mkdir()
    (tmp_path / "staging" / "crashed-upload" / "adapter_config.json").write_text("{")
    again = AdapterRegistry(shapes, 8, AdapterStore(tmp_path))
    restored = {r.name: r for r in again.restore()}
    assert set(restored) == {"a", "a2"}
    assert restored["a"].version == rec_a.version and restored["a"].rank == 2
    assert restored["a"].report == rec_a.report
    assert not (tmp_path / "blobs" / rec_b.version).exists(), "unreferenced blob collected at start-up"
    assert list((tmp_path / "staging").iterdir()) == []
    weights = again.load(restored["a"])
    assert weights.max_rank == 2


def test_refused_adapter_leaves_the_store_unchanged(
    tmp_path: Path, adapters: dict[str, Path], shapes: dict[str, LinearShape]
) -> None:
    reg = AdapterRegistry(shapes, 8, AdapterStore(tmp_path))
    reg.add_dir("a", adapters["a"])
    before = snapshot(tmp_path)
    bad = tmp_path.parent / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(
        json.dumps({**json.loads((adapters["a"] / "adapter_config.json").read_text()), "use_dora": True})
    )
    (bad / "adapter_model.safetensors").write_bytes(
        (adapters["a"] / "adapter_model.safetensors").read_bytes()
    )
    with pytest.raises(AdapterError, match="use_dora"):
        reg.add_dir("bad", bad)
    with pytest.raises(AdapterError, match="invalid adapter name"):
        reg.add_dir("../x", adapters["a"])
    assert snapshot(tmp_path) == before


def test_changed_on_disk_is_refused(
    tmp_path: Path, adapters: dict[str, Path], shapes: dict[str, LinearShape]
) -> None:
    reg = AdapterRegistry(shapes, 8, AdapterStore(tmp_path))
    rec, _ = reg.add_dir("a", adapters["a"])
    blob = rec.path / "adapter_model.safetensors"
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(AdapterError, match="changed on disk"):
        reg.load(rec)
