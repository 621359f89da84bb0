"""Who else uses the store: process identities, liveness, and pin files.

Several `loraplex serve` processes may share one adapter store (an RWX volume such as NFS). Each
names itself `<host>-<pid>-<nonce>`, and that token names its staging dir and its pin files:

    root/pins/<sha256>/<host>-<pid>-<nonce>    this process runs requests on that version

Semantics: a process is alive when it runs on this host, its pid exists and the process holding
that pid started before the file was last touched (a container restarted in the same pod gets the
same host name and pid 1 again: the new pid 1 started after its dead predecessor's last touch);
or, on another host (whose pids we cannot see), when it touched its files less than
PROCESS_TTL_SECONDS ago; every rescan (`store_rescan_seconds`) touches them. Where /proc cannot
tell a start time, a live pid counts as alive (the safe side). A pin of a dead process is ignored
and removed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from server.lora.killpoints import reached

log = logging.getLogger(__name__)

# Longer than any sane rescan interval (the setting allows at most 60 s): a remote process that has
# not touched its files for this long is taken for dead.
PROCESS_TTL_SECONDS = 300.0
VERSION_RE = re.compile(r"^[0-9a-f]{64}$")


def _host() -> str:
    # the token is a file name: keep it to characters every filesystem takes
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "localhost"


@dataclass(frozen=True, slots=True)
class ProcessId:
    host: str
    pid: int
    nonce: str

    @property
    def token(self) -> str:
        return f"{self.host}-{self.pid}-{self.nonce}"

    @classmethod
    def this(cls) -> ProcessId:
        # the nonce tells two lives of one pid apart (restarts, containers that all run as pid 1)
        return cls(_host(), os.getpid(), secrets.token_hex(4))

    @classmethod
    def parse(cls, token: str) -> ProcessId | None:
        host, _, rest = token.rpartition("-")
        host, _, pid = host.rpartition("-")
        if not host or not pid.isdigit() or not rest:
            return None
        return cls(host, int(pid), rest)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def alive(token: str, mtime: float, now: float | None = None) -> bool:
    """Semantics: see the module docstring. `mtime` is that process's last touch of the file."""
    proc = ProcessId.parse(token)
    if proc is not None and proc.host == _host():
        return _pid_alive(proc.pid) and not _started_after(proc.pid, mtime)
    return (now if now is not None else time.time()) - mtime < PROCESS_TTL_SECONDS


# /proc's start times are clock ticks after a boot time in whole seconds: a margin covers both
_START_MARGIN_SECONDS = 2.0


def start_time(pid: int) -> float | None:
    """When the process holding `pid` started (epoch seconds), or None when /proc cannot say."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, counted after the command name
        lines = Path("/proc/stat").read_text().splitlines()
        boot = next(int(line.split()[1]) for line in lines if line.startswith("btime "))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def _started_after(pid: int, mtime: float) -> bool:
    """Whether the process now holding `pid` started after `mtime` (so it cannot have touched the
    file then: it reused a dead process's pid). False when /proc cannot say."""
    started = start_time(pid)
    return started is not None and started > mtime + _START_MARGIN_SECONDS


class Pins:
    """This process's pins (reference-counted: one file per version however many requests use it)
    and a reader of everyone's. Thread-safe: the engine thread pins, the rescan thread reads."""

    def __init__(self, root: Path, me: ProcessId) -> None:
        self.root = root
        self.me = me
        self._refs: Counter[str] = Counter()
        self._lock = threading.Lock()
        root.mkdir(parents=True, exist_ok=True)

    def _file(self, version: str) -> Path:
        return self.root / version / self.me.token

    def pin(self, version: str) -> None:
        with self._lock:
            self._refs[version] += 1
            if self._refs[version] == 1:
                self._create(version)
        reached("pinned")

    def unpin(self, version: str) -> None:
        with self._lock:
            if self._refs[version] <= 0:
                return
            self._refs[version] -= 1
            if self._refs[version] == 0:
                del self._refs[version]
                self._drop(version)

    def _drop(self, version: str) -> None:
        self._file(version).unlink(missing_ok=True)
        # leave the store as it was before the request (another process pinning now retries)
        with contextlib.suppress(OSError):
            self._file(version).parent.rmdir()

    def held(self) -> set[str]:
        with self._lock:
            return set(self._refs)

    def _create(self, version: str) -> None:
        # A collector may remove the empty version dir between our mkdir and our file: retry.
        for _ in range(5):
            try:
                self._file(version).parent.mkdir(exist_ok=True)
                self._file(version).touch()
                return
            except FileNotFoundError:
                continue
            except OSError:  # never fail a request over a pin: the grace period still guards it
                break
        log.error("could not pin adapter version %s in the store", version[:12])

    def live(self, version: str | None = None) -> set[str]:
        """Versions pinned by a live process (all, or just `version`). Removes dead pins on the way."""
        dirs = [self.root / version] if version else list(self.root.iterdir())
        now, pinned = time.time(), self.held()
        for d in dirs:
            if not VERSION_RE.match(d.name) or d.name in pinned:
                continue
            try:
                entries = list(os.scandir(d))
            except (FileNotFoundError, NotADirectoryError):
                continue
            for entry in entries:
                try:
                    mtime = entry.stat().st_mtime
                except FileNotFoundError:
                    continue
                if alive(entry.name, mtime, now):
                    pinned.add(d.name)
                    break
                log.info("dropping the pin of dead process %s on %s", entry.name, d.name[:12])
                Path(entry.path).unlink(missing_ok=True)
            else:
                with contextlib.suppress(OSError):  # fails harmlessly when someone pinned meanwhile
                    d.rmdir()
        return pinned if version is None else pinned & {version}

    def refresh(self) -> None:
        """Touch this process's pin files, so that other hosts keep trusting them."""
        with self._lock:  # under the lock: a version unpinned meanwhile must not be pinned again
            for version in self._refs:
                try:
                    os.utime(self._file(version))
                except FileNotFoundError:  # a collector took us for dead: pin again
                    self._create(version)

    def close(self) -> None:
        """Remove this process's pin files (at shutdown; pinning again re-creates them)."""
        with self._lock:
            for version in self._refs:
                self._drop(version)
