"""Crash consistency of the adapter store, below the HTTP layer: a child process opens the store,
runs one operation with LORAPLEX_TEST_KILL naming a kill point, and dies there by SIGKILL; then a
fresh registry on the same store (the next start) must find it consistent: every listed adapter
loads and hashes to its version, the operation took effect wholly or not at all, and nothing of the
dead process is left. The HTTP kill points (mid-body, right before the 201, mid-generation) are in
tests/e2e/test_crash_consistency.py. Also here: the fsyncs behind "a 201 is durable", damaged blobs
in quarantine, and the hook itself."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from server.lora import killpoints
from server.lora.adapter import LinearShape
from server.lora.pins import ProcessId
from server.lora.registry import AdapterRegistry, adapter_version
from server.lora.store import FILES, AdapterStore
from server.lora.weights import linear_modules

MAX_RANK = 8
# One store operation in a process of its own, as the registry runs it (add_dir: a copy into the
# staging dir, then commit; remove; the engine's pin; the start's collection), without importing
# torch (~0.1 s a process instead of ~5). argv: store root, operation, name, argument (JSON).
# Reaching the armed kill point ends it with SIGKILL; finishing prints "survived".
WORKER = textwrap.dedent(
    """
    import json, shutil, sys
    from pathlib import Path
    from server.lora.store import FILES, AdapterStore

    root, op, name, arg = sys.argv[1:]
    store = AdapterStore(Path(root))
    if op == "add":
        spec = json.loads(arg)
        staged = store.new_staging_dir()
        for fname in FILES:
            shutil.copyfile(Path(spec["src"]) / fname, staged / fname)
        store.commit(name, spec["version"], staged, spec["record"])
    elif op == "remove":
        store.remove(name)
    elif op == "pin":
        store.pins.pin(json.loads(arg))
    elif op == "collect":
        store.collect_garbage(grace=0)
    print("survived")
    """
)


@pytest.fixture(scope="module")
def shapes(tiny_checkpoint: Callable[[str], Path]) -> dict[str, LinearShape]:
    from transformers import AutoModelForCausalLM

    return dict(linear_modules(AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama"))))


def other_process(nonce: str) -> ProcessId:
    """Another live process on this host (our pid, so it counts as alive, with its own nonce)."""
    return ProcessId(ProcessId.this().host, os.getpid(), nonce)


@dataclass
class Store:
    root: Path
    shapes: dict[str, LinearShape]
    versions: dict[str, str]  # name -> version, as the store held them before the child ran

    def kill_at(self, point: str, op: str, name: str = "", arg: object = None) -> int:
        """Run `op` in a child armed with `point`; it must die there. Returns the child's pid."""
        child = subprocess.Popen(
            [sys.executable, "-c", WORKER, str(self.root), op, name, json.dumps(arg)],
            env={**os.environ, killpoints.KILL_ENV: point},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        output, _ = child.communicate(timeout=120)
        assert child.returncode == -signal.SIGKILL, f"not killed at {point}: {output}"
        owners = [ProcessId.parse(token) for token in self.dead_tokens()]
        assert [p.pid if p else None for p in owners] == [child.pid], "its staging dir, and no other"
        return child.pid

    def dead_tokens(self) -> list[str]:
        return [d.name for d in (self.root / "staging").iterdir()]

    def restart(self) -> dict[str, str]:
        """Open the store as the next start does and check that it is consistent; the names and
        versions it serves."""
        store = AdapterStore(self.root)
        reg = AdapterRegistry(self.shapes, MAX_RANK, store)
        try:
            served = {r.name: r.version for r in reg.restore()}
            for record in reg.records():
                assert adapter_version(record.path) == record.version
                reg.load(record)  # parses and validates it, as the CPU cache would
            assert store_layout(self.root) == {
                "blobs": sorted(set(served.values())),  # the unreferenced ones are collected
                "names": sorted(served),
                "pins": [],
                "staging": [store.me.token],
            }
            assert list(store.staging.iterdir()) == [], "only our own staging dir, empty"
            for version in served.values():
                assert sorted(p.name for p in (self.root / "blobs" / version).iterdir()) == sorted(
                    (*FILES, "record.json")
                )
            return served
        finally:
            reg.close()


def store_layout(root: Path) -> dict[str, list[str]]:
    """What is in the store: every top-level dir and what it holds (dot files included)."""
    return {d.name: sorted(p.name for p in d.iterdir()) for d in sorted(root.iterdir())}


def adding(src: Path, shapes: dict[str, LinearShape]) -> dict[str, object]:
    """What add_dir hands to commit for `src`: its version and its validated record."""
    record, _ = AdapterRegistry(shapes, MAX_RANK).add_dir("validated", src)
    return {"src": str(src), "version": record.version, "record": record.to_json()}


@pytest.fixture
def store(tmp_path: Path, adapters: dict[str, Path], shapes: dict[str, LinearShape]) -> Store:
    """A store holding `keep` (adapter a) and `swap` (adapter b), written by a process that has
    since shut down cleanly."""
    reg = AdapterRegistry(shapes, MAX_RANK, AdapterStore(tmp_path / "store", other_process("setup")))
    versions = {
        name: reg.add_dir(name, adapters[src])[0].version for name, src in {"keep": "a", "swap": "b"}.items()
    }
    reg.close()
    return Store(tmp_path / "store", shapes, versions)


COMMIT_POINTS = ["commit-staged", "commit-blob", "commit-pointer-temp", "commit-done"]


@pytest.mark.parametrize("point", COMMIT_POINTS)
def test_killed_while_adding_a_new_name(store: Store, adapters: dict[str, Path], point: str) -> None:
    store.kill_at(point, "add", "fresh", adding(adapters["c"], store.shapes))
    served = store.restart()
    committed = point == "commit-done"  # the pointer was renamed into place before the kill
    expected = {**store.versions, "fresh": adapter_version(adapters["c"])} if committed else store.versions
    assert served == expected


@pytest.mark.parametrize("point", COMMIT_POINTS)
def test_killed_while_replacing(store: Store, adapters: dict[str, Path], point: str) -> None:
    store.kill_at(point, "add", "swap", adding(adapters["c"], store.shapes))
    assert (store.root / "blobs" / store.versions["swap"]).is_dir(), "the old blob is still there"
    served = store.restart()
    new = adapter_version(adapters["c"])
    assert served == {**store.versions, "swap": new if point == "commit-done" else store.versions["swap"]}


def test_killed_while_deleting(store: Store) -> None:
    store.kill_at("remove-unlinked", "remove", "swap")
    assert (store.root / "blobs" / store.versions["swap"]).is_dir(), "killed before any collection"
    assert store.restart() == {"keep": store.versions["keep"]}
    assert not (store.root / "blobs" / store.versions["swap"]).exists(), "its blob was collected"


def test_killed_while_a_request_decodes(store: Store) -> None:
    pid = store.kill_at("pinned", "pin", arg=store.versions["swap"])
    pins = store.root / "pins" / store.versions["swap"]
    assert [p.name for p in pins.iterdir()] == [t for t in store.dead_tokens() if f"-{pid}-" in t]
    assert store.restart() == store.versions  # the dead process's pin is dropped


def test_killed_while_collecting(store: Store) -> None:
    old = store.versions.pop("swap")
    pointer = store.root / "names" / "swap"
    pointer.unlink()  # deleted: the next start collects its blob, and is killed doing it
    store.kill_at("gc-moved", "collect")
    assert not (store.root / "blobs" / old).exists(), "moved out of blobs/"
    assert store.restart() == store.versions


def test_a_blob_a_dead_collector_held_is_put_back_when_named(store: Store) -> None:
    """The collector checked that no pointer named the blob, then another process committed the
    same bytes (its touch and its pointer) just before the collector's move: the collector would
    have put the blob back, but was killed first. The next start puts it back."""
    pointer = store.root / "names" / "swap"
    pointer.unlink()
    store.kill_at("gc-moved", "collect")
    pointer.write_text(f"{store.versions['swap']}\n")  # the racing commit's pointer
    assert store.restart() == store.versions


def test_a_commit_is_durable_before_it_returns(
    tmp_path: Path, adapters: dict[str, Path], shapes: dict[str, LinearShape], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a 201 promises survives a power cut: the blob's files and dir entries, then the pointer
    and its dir entry, each fsynced, the blob's before the pointer's."""
    root = tmp_path / "store"
    reg = AdapterRegistry(shapes, MAX_RANK, AdapterStore(root))
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))  # the path the fd names at fsync time
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    record, _ = reg.add_dir("durable", adapters["a"])
    reg.close()

    def last(pattern: str) -> int:
        hits = [i for i, p in enumerate(synced) if re.search(pattern, p)]
        assert hits, f"nothing matching {pattern!r} was fsynced: {synced}"
        return hits[-1]

    for fname in FILES:
        last(rf"/staging/[^/]+/tmp[^/]*/{re.escape(fname)}$")  # before the blob's rename
    last(r"/staging/[^/]+/tmp[^/]*/\.record\.json\.")  # under its temporary name
    staged_dir = last(r"/staging/[^/]+/tmp[^/]*$")  # its entries: the files above
    blobs_dir = last(r"/store/blobs$")  # the rename into blobs/
    pointer_file = last(r"/staging/[^/]+/\.durable\.")  # the pointer, under its temporary name
    names_dir = last(r"/store/names$")  # the pointer's rename
    assert staged_dir < blobs_dir < pointer_file < names_dir
    assert (root / "names" / "durable").read_text().strip() == record.version


def test_a_damaged_blob_is_quarantined_and_the_others_still_served(
    store: Store, adapters: dict[str, Path], shapes: dict[str, LinearShape], caplog: pytest.LogCaptureFixture
) -> None:
    weights = store.root / "blobs" / store.versions["swap"] / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit of a weight: still a valid file, no longer this version
    weights.write_bytes(bytes(data))

    reg = AdapterRegistry(shapes, MAX_RANK, AdapterStore(store.root))
    with caplog.at_level(logging.ERROR, logger="server.lora"):
        served = {r.name: r.version for r in reg.restore()}
    assert served == {"keep": store.versions["keep"]}
    assert "does not hash to its name" in caplog.text and "swap" in caplog.text
    (moved,) = (store.root / "quarantine").iterdir()
    assert moved.name.startswith(store.versions["swap"]) and (moved / "blob" / weights.name).is_file()
    assert not (store.root / "blobs" / store.versions["swap"]).exists()

    # the same bytes uploaded again repair the name
    record, _ = reg.add_dir("swap", adapters["b"])
    assert record.version == store.versions["swap"] and reg.load(record).max_rank == 4
    reg.close()
    shutil.rmtree(store.root / "quarantine")  # looked at above; the rest must be as after a crash
    assert store.restart() == store.versions


def test_a_malformed_kill_point_is_refused_loudly() -> None:
    assert killpoints.armed_point(None) is None and killpoints.armed_point("") is None
    assert killpoints.armed_point("commit-blob") == "commit-blob"
    with pytest.raises(ValueError, match="LORAPLEX_TEST_KILL='commit_blob': expected one of"):
        killpoints.armed_point("commit_blob")
    child = subprocess.run(
        [sys.executable, "-c", "import server.lora.store"],
        env={**os.environ, killpoints.KILL_ENV: "nowhere"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == 1 and "expected one of" in child.stderr


def test_every_kill_point_is_placed_once() -> None:
    """Each point in POINTS is reached at exactly one place in the server, and no call names a
    point that does not exist (it would never fire)."""
    server = Path(killpoints.__file__).parents[1]
    calls: list[str] = []
    for source in server.rglob("*.py"):
        calls += re.findall(r"""(?:reached\(|kill_point=)"([^"]*)"\)?""", source.read_text())
    assert sorted(calls) == sorted(killpoints.POINTS)
