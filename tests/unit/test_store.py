"""The adapter store: content-addressed, atomic, restart-safe, and shared by several registries
(each standing for a process: its own ProcessId) through pointer files and rescans."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from server.errors import AdapterError, AdapterNotFoundError
from server.lora.adapter import LinearShape
from server.lora.pins import ProcessId
from server.lora.registry import AdapterRegistry
from server.lora.store import AdapterStore
from server.lora.weights import linear_modules


@pytest.fixture(scope="module")
def shapes(tiny_checkpoint: Callable[[str], Path]) -> dict[str, LinearShape]:
    from transformers import AutoModelForCausalLM

    return dict(linear_modules(AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama"))))


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))
    }


def process(nonce: str) -> ProcessId:
    """Another live process on this host (our pid, so it counts as alive, with its own nonce)."""
    return ProcessId(ProcessId.this().host, os.getpid(), nonce)


def registry(root: Path, shapes: dict[str, LinearShape], nonce: str = "p1") -> AdapterRegistry:
    return AdapterRegistry(shapes, 8, AdapterStore(root, process(nonce)))


def age(path: Path, seconds: float) -> None:
    t = path.stat().st_mtime - seconds
    os.utime(path, (t, t))


def test_store_round_trip_and_restart(
    tmp_path: Path, adapters: dict[str, Path], shapes: dict[str, LinearShape]
) -> None:
    reg = registry(tmp_path, shapes)
    rec_a, _ = reg.add_dir("a", adapters["a"])
    rec_b, _ = reg.add_dir("b", adapters["b"])
    assert rec_a.path == tmp_path / "blobs" / rec_a.version
    assert (rec_a.path / "adapter_model.safetensors").read_bytes() == (
        adapters["a"] / "adapter_model.safetensors"
    ).read_bytes()
    # one pointer file per name, holding the version; no temporary files left beside them
    assert {p.name: p.read_text().strip() for p in (tmp_path / "names").iterdir()} == {
        "a": rec_a.version,
        "b": rec_b.version,
    }

    same, _ = reg.add_dir("a2", adapters["a"])  # same bytes, second name: one blob
    assert same.version == rec_a.version and len(list((tmp_path / "blobs").iterdir())) == 2

    reg.remove("b")
    with pytest.raises(AdapterNotFoundError):
        reg.resolve("b")
    assert not (tmp_path / "names" / "b").exists()
    assert (tmp_path / "blobs" / rec_b.version).is_dir(), "running requests may still read it"
    reg.close()  # a clean shutdown: this process's staging dir goes
    assert list((tmp_path / "staging").iterdir()) == []

    # a process that crashed long ago mid-upload (a dead pid) left its staging dir behind
    crashed = tmp_path / "staging" / f"{ProcessId.this().host}-{dead_pid()}-0bad"
    (crashed / "tmp1").mkdir(parents=True)
    (crashed / "tmp1" / "adapter_config.json").write_text("{")
    age(crashed, 3600)
    again = registry(tmp_path, shapes, "p2")
    restored = {r.name: r for r in again.restore()}
    assert set(restored) == {"a", "a2"}
    assert restored["a"].version == rec_a.version and restored["a"].rank == 2
    assert restored["a"].report == rec_a.report
    # alone on the store at start-up: the deleted name's blob is collected at once
    assert not (tmp_path / "blobs" / rec_b.version).exists()
    assert [p.name for p in (tmp_path / "staging").iterdir()] == [again.store.me.token]  # type: ignore[union-attr]
    weights = again.load(restored["a"])
    assert weights.max_rank == 2


def test_refused_adapter_leaves_the_store_unchanged(
    tmp_path: Path, adapters: dict[str, Path], shapes: dict[str, LinearShape]
) -> None:
    reg = registry(tmp_path, shapes)
    reg.add_dir("a", adapters["a"])
    before = snapshot(tmp_path)
    bad = tmp_path.parent / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(
        json.dumps({**json.loads((adapters["a"] / "adapter_config.json").read_text()), "use_qalora": True})
    )
    (bad / "adapter_model.safetensors").write_bytes(
        (adapters["a"] / "adapter_model.safetensors").read_bytes()
    )
    with pytest.raises(AdapterError, match="use_qalora"):
        reg.add_dir("bad", bad)
    with pytest.raises(AdapterError, match="invalid adapter name"):
        reg.add_dir("../x", adapters["a"])
    assert snapshot(tmp_path) == before


def test_changed_on_disk_is_refused(
    tmp_path: Path, adapters: dict[str, Path], shapes: dict[str, LinearShape]
) -> None:
    reg = registry(tmp_path, shapes)
    rec, _ = reg.add_dir("a", adapters["a"])
    blob = rec.path / "adapter_model.safetensors"
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(AdapterError, match="changed on disk"):
        reg.load(rec)


def dead_pid() -> int:
    """A pid that no process has now (one of ours that has exited)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_two_processes_converge(
    tmp_path: Path, adapters: dict[str, Path], shapes: dict[str, LinearShape]
) -> None:
    one, two = registry(tmp_path, shapes, "one"), registry(tmp_path, shapes, "two")
    two.restore()
    first, _ = one.add_dir("x", adapters["a"])
    # unknown to `two` (no rescan yet): looked up in the store before a 404
    assert "x" not in {r.name for r in two.records()}
    assert two.resolve("x").version == first.version
    with pytest.raises(AdapterNotFoundError):
        two.resolve("never-uploaded")
    with pytest.raises(AdapterNotFoundError):
        two.resolve("../names/x")

    second, _ = one.add_dir("x", adapters["b"])  # replaced on `one`
    held = two.resolve("x")  # what a request on `two` started with
    assert two.sync() == ["x"]
    assert two.resolve("x").version == second.version and held.version == first.version
    assert two.sync() == []

    one.add_dir("y", adapters["a"])
    assert two.remove("y").version == first.version  # deletable from `two` before its rescan
    one.remove("x")
    assert one.sync() == ["y"] and two.sync() == ["x"]
    for reg in (one, two):
        assert reg.records() == []
        with pytest.raises(AdapterNotFoundError):
            reg.resolve("x")


def test_names_json_of_an_older_store_is_migrated_once(
    tmp_path: Path, adapters: dict[str, Path], shapes: dict[str, LinearShape]
) -> None:
    # an older store: blobs plus one names.json (made here from a new one, then reshaped)
    reg = registry(tmp_path, shapes)
    rec, _ = reg.add_dir("old", adapters["a"])
    reg.close()
    shutil.rmtree(tmp_path / "names")
    shutil.rmtree(tmp_path / "pins")
    (tmp_path / "names.json").write_text(json.dumps({"old": rec.version, "twin": rec.version}))

    again = registry(tmp_path, shapes, "p2")
    assert {r.name: r.version for r in again.restore()} == {"old": rec.version, "twin": rec.version}
    assert (tmp_path / "names" / "old").read_text().strip() == rec.version
    assert not (tmp_path / "names.json").exists() and (tmp_path / "names.json.migrated").is_file()
    again.remove("twin")
    # the next start does not migrate again: the deleted name stays deleted
    assert [r.name for r in registry(tmp_path, shapes, "p3").restore()] == ["old"]
