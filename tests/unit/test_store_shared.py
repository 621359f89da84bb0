"""One adapter store, several processes: staging dirs apart, concurrent writers from real processes,
garbage collection with a grace period and pins, and the engine pinning what it runs."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from server.engine.sequence import SamplingParams, Sequence, SequenceStatus
from server.lora.pins import ProcessId, start_time
from server.lora.registry import AdapterRegistry
from server.lora.store import GC_GRACE_SECONDS, AdapterStore
from tests.unit.test_store import age, dead_pid, process

REPO = Path(__file__).resolve().parents[2]
HOST = ProcessId.this().host


def put(store: AdapterStore, name: str, content: bytes) -> str:
    """Commit a stand-in blob (the store does not parse adapters) under `name`; its version."""
    staged = store.new_staging_dir()
    for fname in ("adapter_config.json", "adapter_model.safetensors"):
        (staged / fname).write_bytes(content)
    version = hashlib.sha256(content).hexdigest()
    store.commit(name, version, staged, {"rank": 1})
    return version


def test_staging_dirs_are_per_process(tmp_path: Path) -> None:
    mine = AdapterStore(tmp_path, process("mine"))
    upload = mine.new_staging_dir()
    (upload / "adapter_model.safetensors").write_bytes(b"half an upload")
    assert upload.parent == tmp_path / "staging" / mine.me.token
    dead_local = tmp_path / "staging" / f"{HOST}-{dead_pid()}-dead"
    remote = tmp_path / "staging" / "elsewhere-42-beef"
    legacy = tmp_path / "staging" / "tmpk2j3h4"  # an upload dir of the single-process layout
    for d in (dead_local, remote, legacy):
        (d / "part").mkdir(parents=True)

    other = AdapterStore(tmp_path, process("other"))  # another process starts: ours is untouched
    other.collect_garbage(grace=0)
    assert upload.is_dir() and (upload / "adapter_model.safetensors").read_bytes() == b"half an upload"
    assert not dead_local.exists(), "a dead process of this host (its pid is gone): removed at once"
    assert remote.is_dir() and legacy.is_dir(), "recent, liveness unknown: kept for a grace period"
    assert not other.alone(), "a live local process and a recently seen remote one"

    for d in (remote, legacy):
        age(d, 3600)
    # a live process's dir is kept however long ago it was touched, as long as that was after the
    # process started (before it, the dir would be a dead predecessor's whose pid was reused)
    started = start_time(os.getpid())
    assert started is not None
    os.utime(mine.staging, (started + 5, started + 5))
    other.collect_garbage(grace=0)
    assert upload.is_dir() and not dead_local.exists() and not remote.exists() and not legacy.exists()
    other.close()
    assert [p.name for p in (tmp_path / "staging").iterdir()] == [mine.me.token]


WRITER = """
import hashlib, sys
from pathlib import Path
from server.lora.store import AdapterStore
root, me, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
store = AdapterStore(root)
for k in range(n):
    for name in (f"{me}-{k}", "shared"):
        staged = store.new_staging_dir()
        content = f"{me}-{k}".encode()
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            (staged / f).write_bytes(content)
        store.commit(name, hashlib.sha256(content).hexdigest(), staged, {"rank": 1})
    if k == n // 2:
        store.remove(f"{me}-0")
store.close()
"""


def test_concurrent_writers_in_separate_processes_lose_nothing(tmp_path: Path) -> None:
    writers, n = ["w0", "w1", "w2"], 20
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), w, str(n)], cwd=REPO) for w in writers
    ]
    assert [p.wait(timeout=120) for p in procs] == [0] * len(writers)
    store = AdapterStore(tmp_path, process("reader"))
    names = store.names()
    versions = {
        f"{w}-{k}": hashlib.sha256(f"{w}-{k}".encode()).hexdigest() for w in writers for k in range(n)
    }
    # every writer's names survive the others' writes (a read-modify-written index loses some)
    assert {k: v for k, v in names.items() if k != "shared"} == {
        k: v for k, v in versions.items() if not k.endswith("-0")
    }
    assert names["shared"] in versions.values()
    assert sorted(p.name for p in (tmp_path / "names").iterdir()) == sorted(names), "no temp files left"
    for version in names.values():
        assert {p.name for p in store.blob(version).iterdir()} == {
            "adapter_config.json",
            "adapter_model.safetensors",
            "record.json",
        }
    assert [p.name for p in (tmp_path / "staging").iterdir()] == [store.me.token]


def test_garbage_collection_waits_for_the_grace_period_and_pins(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path, process("collector"))
    user = AdapterStore(tmp_path, process("user"))  # a live process running requests
    v_kept, v_pinned, v_dead_pin, v_remote, v_old = (
        put(store, n, n.encode()) for n in ("kept", "pinned", "dead-pin", "remote", "old")
    )
    for name in ("pinned", "dead-pin", "remote", "old"):
        assert store.remove(name) is not None
    age(store.blob(v_old), GC_GRACE_SECONDS + 60)
    assert store.collect_garbage() == [v_old], "only the blob unreferenced for the whole grace period"

    user.pins.pin(v_pinned)
    user.pins.pin(v_pinned)  # two requests, one pin file
    dead = tmp_path / "pins" / v_dead_pin / f"{HOST}-{dead_pid()}-0bad"
    remote = tmp_path / "pins" / v_remote / "elsewhere-42-beef"
    for pin in (dead, remote):
        pin.parent.mkdir(parents=True)
        pin.touch()
    assert sorted(store.collect_garbage(grace=0)) == [v_dead_pin]
    assert not dead.exists(), "a dead process's pin is dropped"
    assert store.blob(v_kept).is_dir() and store.blob(v_pinned).is_dir() and store.blob(v_remote).is_dir()

    age(remote, 3600)  # a remote process that stopped refreshing its pin is gone
    user.pins.unpin(v_pinned)
    assert store.collect_garbage(grace=0) == [v_remote]
    user.pins.unpin(v_pinned)  # the last request: the pin file goes
    assert store.collect_garbage(grace=0) == [v_pinned]
    assert [p.name for p in (tmp_path / "blobs").iterdir()] == [v_kept]
    assert list((tmp_path / "pins").iterdir()) == []


def test_a_collection_racing_a_commit_loses_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import server.lora.store as store_module

    store = AdapterStore(tmp_path, process("committer"))
    collector = AdapterStore(tmp_path, process("collector"))
    version = put(store, "x", b"x")
    store.remove("x")
    blob = store.blob(version)
    # a commit touched the blob after the collector looked at it: the collector puts it back
    assert not collector._discard(blob, blob.stat().st_mtime_ns - 1)
    assert (blob / "record.json").is_file()

    # the collector takes the blob between the commit's touch and its pointer: the commit notices
    # and moves its own copy in
    write_atomic = store_module.write_atomic
    raced: list[bool] = []

    def racing(path: Path, data: bytes, *args: Any, **kwargs: Any) -> None:
        if path.parent == store.pointers and not raced:
            raced.append(collector._discard(blob, blob.stat().st_mtime_ns))
        write_atomic(path, data, *args, **kwargs)

    monkeypatch.setattr(store_module, "write_atomic", racing)
    assert put(store, "x", b"x") == version
    assert raced == [True] and (blob / "record.json").is_file()
    assert store.names() == {"x": version}


def test_the_engine_pins_what_it_runs(
    tmp_path: Path,
    tiny_checkpoint: Callable[[str], Path],
) -> None:
    from transformers import AutoModelForCausalLM

    from server.engine.config import EngineConfig
    from server.engine.engine import LLMEngine
    from server.model.loader import load_base
    from tests.peft_factory import make_adapter

    path = tiny_checkpoint("llama")
    base = load_base(path, "tiny", quantization="none", device="cpu", max_loras=2, max_lora_rank=8)
    make_adapter(
        lambda: AutoModelForCausalLM.from_pretrained(path),
        tmp_path / "src",
        seed=1,
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
    )
    reg = AdapterRegistry(base.linear_shapes, 8, AdapterStore(tmp_path / "store", process("engine")))
    record, _ = reg.add_dir("a", tmp_path / "src")
    engine = LLMEngine(
        base, reg, EngineConfig(max_loras=2, max_lora_rank=8, max_model_len=128, kv_cache_tokens=512)
    )
    pin = tmp_path / "store" / "pins" / record.version / reg.store.me.token  # type: ignore[union-attr]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    seqs = [Sequence(f"r{i}", [1, 2, 3], params, adapter=record, eos_token_ids=frozenset()) for i in range(2)]
    for seq in seqs:
        engine.add_request(seq)
    while seqs[0].status is SequenceStatus.WAITING:
        if not engine.step():
            engine.cache.wait_for_loads(timeout=60)
    assert pin.is_file(), "admitted: pinned"
    finished = 0
    while engine.has_work():
        finished += sum(o.finished for o in engine.step())
        if finished == 1:
            assert pin.is_file(), "one sequence still runs on it"
    assert finished == 2 and not pin.parent.exists(), "the last one unpinned it, leaving no trace"


@pytest.mark.parametrize("token", ["host-1-ab", "my-host.example-77-0f0f"])
def test_process_tokens_round_trip(token: str) -> None:
    proc = ProcessId.parse(token)
    assert proc is not None and proc.token == token
    assert ProcessId.parse("tmpabc") is None
    me = ProcessId.this()
    assert ProcessId.parse(me.token) == me and me.pid == os.getpid()


def test_a_restarted_container_does_not_keep_its_predecessors_pins_alive() -> None:
    """Same host name and pid 1 again after a restart in the same pod: a live pid alone would say
    alive. The process holding the pid started after the file's last touch, so it is a stranger."""
    import os
    import time

    from server.lora import pins

    me = f"{pins._host()}-{os.getpid()}-deadbeef"
    now = time.time()
    assert pins.alive(me, now, now=now)  # touched by us, now
    assert pins.alive(me, now + 3600, now=now)
    assert not pins.alive(me, now - 10 * 365 * 86400, now=now)  # touched years before we started
    assert not pins.alive(f"{pins._host()}-999999999-deadbeef", now, now=now)  # no such pid
    assert pins.alive("elsewhere-1-deadbeef", now - 10, now=now)
    assert not pins.alive("elsewhere-1-deadbeef", now - pins.PROCESS_TTL_SECONDS - 1, now=now)
