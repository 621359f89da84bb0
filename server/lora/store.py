"""The adapter store on disk: content-addressed blobs and per-name pointers, shareable by several
processes (in production an RWX volume such as NFS mounted by every replica).

    root/blobs/<sha256>/          adapter_config.json, adapter_model.safetensors, record.json;
                                  the dir's mtime: when it was committed or last unreferenced
    root/names/<name>             a pointer: the version (sha256 hex) that <name> serves
    root/pins/<sha256>/<proc>     process <proc> runs requests on that version (see pins.py)
    root/staging/<proc>/          <proc>'s uploads and pointers being written, never read as
                                  adapters; also where its collector moves a blob to before
                                  deleting it (.gc-<sha256>-*/blob)
    root/quarantine/<sha256>-*/   blobs whose bytes turned out not to hash to their name
    root/names.json.migrated      the one index of older stores, once copied into names/

<proc> = `<host>-<pid>-<nonce>`, one per process. Semantics:
- Every file is written under a temporary name in the writer's staging dir, fsynced, then renamed
  into place and its new parent dir fsynced, so a crash or a concurrent writer leaves the old state
  or the new one, never half of it, and what a commit returned survives a power cut. Two processes
  writing one name: the last rename wins. Nothing is read-modify-written, so no update is lost.
- A blob is in place before a pointer names it. Replacing or deleting a name touches the blob it
  named, which starts that blob's grace period.
- A blob is collected only when no pointer names it, no live process pins it, and it has been
  unreferenced for `grace` (default GC_GRACE_SECONDS): that covers a request between resolving a
  name and being admitted (when it pins), and a commit between its blob and its pointer. Deleting a
  name never deletes its blob (requests still running on it keep reading it).
- A process removes only its own staging dir, and those of dead processes (pins.alive: on this
  host at once, by pid; another host's only once untouched for PROCESS_TTL_SECONDS). A blob that a
  dead collector had moved out, and that a pointer names, goes back into blobs/ first.
- Crash consistency (kill -9 anywhere; killpoints.py names the places, the tests kill at each):
  a dead process leaves only its staging dir and its pins, dropped when the store is next opened
  (every start) and by every collection; a pointer never names a missing or partial blob.
- A blob's bytes are hashed once per process before its record is first read (restore, rescans,
  lookups: 30-50 ms at start for 4 adapters, 17 MiB, on 2 busy cores) and at every load from disk
  (registry.load). One that does not hash to its name, or has no readable record, is moved to
  quarantine/ with an error logged: its names are not served, the others are, and uploading the
  same bytes again repairs it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path

from server.errors import AdapterError
from server.lora.killpoints import reached
from server.lora.pins import VERSION_RE, Pins, ProcessId, alive

log = logging.getLogger(__name__)

FILES = ("adapter_config.json", "adapter_model.safetensors")
GC_GRACE_SECONDS = 600.0
GC_INTERVAL_SECONDS = 60.0  # periodic collections, run by the registry's sync
# A pointer is a file name: nothing that could leave names/ (the registry checks names further).
# A namespaced name ("team-a/support") is one file, its "/" written as "%2F".
_POINTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?\Z")
_SLASH = "%2F"


def _pointer_file(name: str) -> str:
    return name.replace("/", _SLASH)


def _name_of(pointer_file: str) -> str:
    return pointer_file.replace(_SLASH, "/")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, tmp_dir: Path | None = None, kill_point: str = "") -> None:
    """Write `data` to a temporary file in `tmp_dir` (default: beside `path`; it must be on the same
    filesystem), fsync it, rename it over `path` and fsync `path`'s dir."""
    fd, tmp = tempfile.mkstemp(dir=tmp_dir or path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        reached(kill_point)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _touch(path: Path) -> bool:
    """Set the mtime to now; False when the path is gone."""
    try:
        os.utime(path)
    except FileNotFoundError:
        return False
    return True


class AdapterStore:
    def __init__(self, root: Path, me: ProcessId | None = None) -> None:
        self.root = root
        self.me = me or ProcessId.this()
        self.blobs = root / "blobs"
        self.pointers = root / "names"
        self.staging_root = root / "staging"
        self.staging = self.staging_root / self.me.token
        self.pins = Pins(root / "pins", self.me)
        # This process's commits, removals and collections, one at a time (other processes are
        # handled by the protocol above, not by locks: NFS locking is unreliable).
        self._lock = threading.Lock()
        self._intact: set[str] = set()  # versions whose bytes this process hashed (see _check)
        for d in (self.blobs, self.pointers, self.staging):
            d.mkdir(parents=True, exist_ok=True)
        _fsync_dir(root)  # a new store's dirs survive a power cut as well as what goes in them
        self._migrate()
        with self._lock:  # before anything is read: a dead collector may hold a named blob
            self._collect_staging(time.time())

    # -- reading -------------------------------------------------------------------------------
    def names(self) -> dict[str, str]:
        """Every name -> version pointer on disk now."""
        found = {}
        for entry in list(os.scandir(self.pointers)):
            if not entry.name.startswith("."):  # dot files are pointers being written
                version = self._read_pointer(Path(entry.path))
                if version is not None:
                    found[_name_of(entry.name)] = version
        return found

    def pointer(self, name: str) -> str | None:
        """The version `name` points to on disk now, if any."""
        return self._read_pointer(self.pointers / _pointer_file(name)) if _POINTER_NAME.match(name) else None

    def blob(self, version: str) -> Path:
        return self.blobs / version

    def record(self, version: str) -> dict[str, object]:
        """The record written beside a blob at commit; ValueError for a blob that is not intact
        (quarantined: see the module doc), FileNotFoundError for one that is not there."""
        with self._lock:
            self._check(version)
        data: dict[str, object] = json.loads((self.blob(version) / "record.json").read_text())
        return data

    def _check(self, version: str) -> None:
        """Hash a blob's files (once per process) and quarantine it when they are not `version`."""
        if version in self._intact:
            return
        from server.lora.registry import adapter_version  # the registry imports this module

        blob = self.blob(version)
        try:
            found = adapter_version(blob)
            json.loads((blob / "record.json").read_text())
        except (OSError, ValueError, AdapterError) as e:
            if not blob.is_dir():
                raise FileNotFoundError(f"adapter blob {version[:12]} is not in the store") from None
            found = f"unreadable ({e})"
        if found == version:
            self._intact.add(version)
            return
        self._quarantine(blob, found)
        raise ValueError(f"adapter blob {version[:12]} is damaged (quarantined)")

    def _quarantine(self, blob: Path, found: str) -> None:
        dest_root = self.root / "quarantine"
        dest_root.mkdir(exist_ok=True)
        dest = Path(tempfile.mkdtemp(dir=dest_root, prefix=f"{blob.name}-")) / "blob"
        try:
            os.rename(blob, dest)
        except FileNotFoundError:  # another process quarantined it first
            shutil.rmtree(dest.parent, ignore_errors=True)
            return
        log.error(
            "adapter blob %s does not hash to its name (its bytes: %s): moved to %s; the names that "
            "point to it are not served until the same adapter is uploaded again",
            blob.name[:12],
            found[:80],
            dest.parent,
        )

    # -- writing -------------------------------------------------------------------------------
    def new_staging_dir(self) -> Path:
        self.staging.mkdir(parents=True, exist_ok=True)  # again, after close()
        return Path(tempfile.mkdtemp(dir=self.staging))

    def commit(self, name: str, version: str, staged: Path, record: dict[str, object]) -> Path:
        """Move a validated staging dir into the blob store (unless that version is already there)
        and point `name` at it. Identical bytes are stored once."""
        if not _POINTER_NAME.match(name):
            raise ValueError(f"invalid pointer name {name!r}")
        target = self.blob(version)
        with self._lock:
            previous = self.pointer(name)
            for _ in range(3):
                # Touching a blob that is there re-references it before our pointer exists, so
                # that a collector racing us sees it changed (see collect_garbage). A damaged one
                # is quarantined by _intact_or_gone, and ours takes its place.
                if not _touch(target) or not self._intact_or_gone(version):
                    if not staged.is_dir():
                        raise OSError(f"adapter blob {version[:12]} was collected while committing it")
                    self._move_in(staged, target, record)
                    self._intact.add(version)  # the bytes the registry just hashed
                if previous is not None and previous != version:
                    _touch(self.blob(previous))  # the replaced version's grace period starts now
                reached("commit-blob")
                self._write_pointer(name, version)
                if (target / "record.json").is_file():
                    break
                # a collector took the blob between our touch and our pointer: put ours back
            else:
                raise OSError(f"adapter blob {version[:12]} keeps disappearing from the store")
            reached("commit-done")
            shutil.rmtree(staged, ignore_errors=True)
        return target

    def _intact_or_gone(self, version: str) -> bool:
        """False when the blob there is damaged (and now quarantined) or was collected meanwhile."""
        try:
            self._check(version)
        except (OSError, ValueError):
            return False
        return True

    def _write_pointer(self, name: str, version: str) -> None:
        # the temporary file goes in our staging dir: a crash leaves it where our successor looks
        self.staging.mkdir(parents=True, exist_ok=True)
        path = self.pointers / _pointer_file(name)
        write_atomic(path, f"{version}\n".encode(), self.staging, kill_point="commit-pointer-temp")

    def _move_in(self, staged: Path, target: Path, record: dict[str, object]) -> None:
        for fname in FILES:
            with open(staged / fname, "rb") as f:
                os.fsync(f.fileno())
        write_atomic(staged / "record.json", json.dumps(record, indent=1).encode())
        _fsync_dir(staged)
        reached("commit-staged")
        try:
            os.replace(staged, target)
        except OSError:
            if not target.is_dir():
                raise
            # another process committed the same bytes a moment ago: theirs serves
        _fsync_dir(self.blobs)

    def remove(self, name: str) -> str | None:
        """Delete `name`'s pointer; the version it named (None when there was none)."""
        with self._lock:
            version = self.pointer(name)
            if version is None:
                return None
            _touch(self.blob(version))  # its grace period starts now, before the pointer goes
            (self.pointers / _pointer_file(name)).unlink(missing_ok=True)
            _fsync_dir(self.pointers)
            reached("remove-unlinked")
            return version

    # -- sharing -------------------------------------------------------------------------------
    def heartbeat(self) -> None:
        """Tell other hosts this process is alive: touch its staging dir and its pins."""
        self.staging.mkdir(parents=True, exist_ok=True)
        _touch(self.staging)
        self.pins.refresh()

    def alone(self) -> bool:
        """No other live process has a staging dir here (so none is mid-upload or mid-request)."""
        now = time.time()
        for entry in list(os.scandir(self.staging_root)):
            if entry.name != self.me.token and alive(entry.name, _mtime(entry.path, now), now):
                return False
        return True

    def close(self) -> None:
        """Remove what this process keeps in the store: its pins and staging dir (at shutdown)."""
        self.pins.close()
        shutil.rmtree(self.staging, ignore_errors=True)

    # -- collecting ----------------------------------------------------------------------------
    def collect_garbage(self, grace: float | None = None) -> list[str]:
        """Remove unreferenced blobs and dead processes' staging dirs (Semantics: module doc).
        Returns the versions removed."""
        grace = GC_GRACE_SECONDS if grace is None else grace
        removed = []
        with self._lock:
            start = time.time()
            self._collect_staging(start)
            named = set(self.names().values())
            pinned = self.pins.live()
            for blob in list(self.blobs.iterdir()):
                version = blob.name
                if not VERSION_RE.match(version) or version in named or version in pinned:
                    continue
                try:
                    mtime_ns = blob.stat().st_mtime_ns
                except FileNotFoundError:
                    continue
                # even with no grace, a blob touched since this pass began is someone's new commit
                if mtime_ns / 1e9 >= start - grace:
                    continue
                if self._discard(blob, mtime_ns):
                    removed.append(version)
        return removed

    def _discard(self, blob: Path, mtime_ns: int) -> bool:
        """Take the blob out of reach with one rename, check again that nobody re-referenced it
        meanwhile (a commit touches it before writing its pointer), then delete or put it back."""
        self.staging.mkdir(parents=True, exist_ok=True)
        # the full version in the name: a successor can put the blob back if we die holding it
        trash = Path(tempfile.mkdtemp(dir=self.staging, prefix=f".gc-{blob.name}-")) / "blob"
        try:
            os.rename(blob, trash)
        except FileNotFoundError:  # another collector was first
            shutil.rmtree(trash.parent, ignore_errors=True)
            return False
        reached("gc-moved")
        wanted = (
            trash.stat().st_mtime_ns != mtime_ns
            or blob.name in self.names().values()
            or bool(self.pins.live(blob.name))
        )
        if wanted:
            # fails when it was committed again meanwhile: the same bytes, so ours is not needed
            with contextlib.suppress(OSError):
                os.rename(trash, blob)
        else:
            log.info("removed unreferenced adapter blob %s", blob.name[:12])
        shutil.rmtree(trash.parent, ignore_errors=True)
        return not wanted

    def _collect_staging(self, now: float) -> None:
        for entry in list(os.scandir(self.staging_root)):
            if entry.name == self.me.token or alive(entry.name, _mtime(entry.path, now), now):
                continue
            self._rescue(Path(entry.path))
            log.info("removing the staging dir of dead process %s", entry.name)
            shutil.rmtree(entry.path, ignore_errors=True)

    def _rescue(self, staging: Path) -> None:
        """Put back a blob that a dead collector moved out (see _discard) while a pointer names it:
        it died between its move and its second look, or before putting the blob back."""
        trash = [p for p in staging.glob(".gc-*-*/blob") if p.is_dir()]
        named = set(self.names().values()) if trash else set()
        for blob in trash:
            version = blob.parent.name[len(".gc-") :].split("-", 1)[0]
            if VERSION_RE.match(version) and version in named and not self.blob(version).exists():
                with contextlib.suppress(OSError):  # someone committed it again meanwhile
                    os.rename(blob, self.blob(version))
                    _fsync_dir(self.blobs)
                    log.warning(
                        "put back adapter blob %s, which a dead collector had moved out", version[:12]
                    )

    # -- older stores --------------------------------------------------------------------------
    def _migrate(self) -> None:
        """Stores written before pointer files kept one names.json: copy it into names/ once, then
        set it aside (reading it at every start would bring deleted names back)."""
        legacy = self.root / "names.json"
        try:
            index = json.loads(legacy.read_text())
        except FileNotFoundError:
            return
        except ValueError as e:
            log.error("%s is unreadable, not migrated: %s", legacy, e)
            return
        for name, version in index.items():
            path = self.pointers / _pointer_file(str(name))
            if _POINTER_NAME.match(str(name)) and VERSION_RE.match(str(version)) and not path.exists():
                self._write_pointer(str(name), str(version))
        try:
            os.replace(legacy, self.root / "names.json.migrated")
            log.info("migrated %d names from %s to %s/", len(index), legacy, self.pointers)
        except FileNotFoundError:
            pass  # another process migrated it at the same moment

    @staticmethod
    def _read_pointer(path: Path) -> str | None:
        try:
            version = path.read_text().strip()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        if not VERSION_RE.match(version):
            log.warning("ignoring pointer %s: %r is not a version", path, version[:80])
            return None
        return version


def _mtime(path: str, default: float) -> float:
    try:
        return os.stat(path).st_mtime
    except FileNotFoundError:
        return default
