"""kill -9 of the real server at the HTTP kill points, then a start on the same store: mid-generation
(a request admitted and pinned), mid-upload (the first MiB of the weights part in staging) and right
before the 201 (committed, not yet answered). After each, the next server must be ready and serve
exactly what was committed: every listed adapter answers a greedy chat and hashes to its version,
nothing half-written is listed, the dead server's staging dir and pins are gone, and the store holds
nothing else. The other kill points are exercised below the HTTP layer (tests/unit, same name).

One server at a time, and one start per kill point: the server that checks the store after a kill
is armed with the next test's kill point (the checks never reach it)."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from server.lora.killpoints import KILL_ENV
from server.lora.registry import adapter_version
from tests.e2e.server_proc import ADMIN_KEY, API_KEY, ServerProc, chat, headers, upload

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
TIMEOUT = 300.0
ENV = {"LORAPLEX_API_KEYS": API_KEY, "LORAPLEX_ADMIN_KEYS": ADMIN_KEY}
# the kill points in the order the tests run: each check server is armed with the next one
ORDER: list[str | None] = ["pinned", "upload-body", "upload-done", None]
FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass
class Chain:
    store: Path
    server: ServerProc | None = None
    committed: dict[str, str] = field(default_factory=dict)  # name -> version the store must serve

    def armed(self, point: str | None) -> ServerProc:
        """A ready server armed with `point` (the one left by the previous test when it is)."""
        if self.server is not None and self.server.env.get(KILL_ENV) == point:
            return self.server
        self.stop()  # an earlier test failed before arming it
        env = {**ENV, KILL_ENV: point} if point else ENV
        self.server = ServerProc(self.store, env=env)
        return self.server.start()

    def killed(self) -> int:
        """Wait for the server to SIGKILL itself at its kill point; its pid."""
        assert self.server is not None and self.server.proc is not None
        proc, self.server = self.server.proc, None
        assert proc.wait(timeout=TIMEOUT) == -signal.SIGKILL, "the server did not die at its kill point"
        return proc.pid

    def stop(self) -> None:
        if self.server is not None:
            server, self.server = self.server, None
            server.stop()  # SIGTERM: a clean shutdown, exit 0


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chain]:
    c = Chain(tmp_path_factory.mktemp("crash") / "store")
    try:
        yield c
    finally:
        c.stop()


def listed(url: str) -> dict[str, str]:
    r = httpx.get(f"{url}/v1/adapters", headers=headers(ADMIN_KEY), timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    return {a["name"]: a["version"] for a in r.json()["data"]}


def restarted(chain: Chain, dead: int, point: str | None) -> None:
    """Start the next server (armed with the next test's point) and check the store it found."""
    server = chain.armed(point)
    assert server.proc is not None
    store = chain.store
    staging = sorted(d.name for d in (store / "staging").iterdir())
    assert not [d for d in staging if f"-{dead}-" in d], "the dead server's staging dir was removed"
    assert [f"-{server.proc.pid}-" in d for d in staging] == [True], "only the new server's is there"
    assert list((store / "staging" / staging[0]).iterdir()) == [], "and it holds nothing yet"
    assert sorted(p.name for p in store.iterdir()) == ["blobs", "names", "pins", "staging"]
    assert list((store / "pins").iterdir()) == [], "the dead server's pins were dropped"
    versions = sorted(set(chain.committed.values()))
    assert sorted(p.name for p in (store / "blobs").iterdir()) == versions, "no blob but the named ones"
    for version in versions:
        assert adapter_version(store / "blobs" / version) == version

    assert listed(server.url) == chain.committed, "exactly what was committed, nothing half-written"
    for name in chain.committed:
        r = chat(server.url, name)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1, r.text


def test_killed_mid_generation(chain: Chain, adapter_dirs: dict[str, Path]) -> None:
    server = chain.armed("pinned")
    r = upload(server.url, "resident", adapter_dirs["qv-r4"])
    assert r.status_code == 201, r.text
    chain.committed["resident"] = r.json()["version"]
    with pytest.raises(httpx.TransportError):  # the connection drops: no answer, not even a 500
        chat(server.url, "resident")
    dead = chain.killed()
    pins = chain.store / "pins" / chain.committed["resident"]
    assert [p.name for p in pins.iterdir() if f"-{dead}-" in p.name], "killed with the request admitted"
    restarted(chain, dead, ORDER[1])


def test_killed_mid_upload(chain: Chain, adapter_dirs: dict[str, Path]) -> None:
    server = chain.armed("upload-body")
    src = adapter_dirs["patterns"]
    weights = (src / FILES[1]).read_bytes()
    assert len(weights) > 2 << 20, "several chunks, so that the kill comes mid-file"
    # the weights part first: the kill comes after its first MiB is in staging
    parts = {f: (f, (src / f).read_bytes()) for f in reversed(FILES)}
    with pytest.raises(httpx.TransportError):
        upload(server.url, "newcomer", src, files=parts)
    dead = chain.killed()
    (partial,) = (chain.store / "staging").glob(f"*-{dead}-*/*/{FILES[1]}")
    assert 0 < partial.stat().st_size < len(weights), "killed with the part half-written"
    restarted(chain, dead, ORDER[2])


def test_killed_right_before_the_201(chain: Chain, adapter_dirs: dict[str, Path]) -> None:
    server = chain.armed("upload-done")
    src = adapter_dirs["patterns"]
    with pytest.raises(httpx.TransportError):
        upload(server.url, "newcomer", src)
    dead = chain.killed()
    # committed before the kill: durable, and served by the next start with its version
    chain.committed["newcomer"] = adapter_version(src)
    restarted(chain, dead, ORDER[3])
