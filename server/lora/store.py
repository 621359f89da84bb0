"""The adapter store on disk: content-addressed blobs and a name -> version index.

    root/blobs/<sha256>/adapter_config.json, adapter_model.safetensors, record.json
    root/names.json        {"name": "<sha256>", ...}
    root/staging/          uploads being written; never read as adapters

Every write goes to a temporary name, is fsynced, then renamed, so a crash leaves either the old
state or the new one, never half an adapter. Blobs no name points to are removed at start-up
(not at delete time: requests still running on an old version keep reading it).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path

log = logging.getLogger(__name__)

FILES = ("adapter_config.json", "adapter_model.safetensors")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class AdapterStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.staging = root / "staging"
        self._index = root / "names.json"
        self._lock = threading.Lock()
        for d in (self.blobs, self.staging):
            d.mkdir(parents=True, exist_ok=True)
        # Leftovers of uploads interrupted by a crash.
        for leftover in self.staging.iterdir():
            shutil.rmtree(leftover, ignore_errors=True)

    def new_staging_dir(self) -> Path:
        return Path(tempfile.mkdtemp(dir=self.staging))

    def names(self) -> dict[str, str]:
        with self._lock:
            return self._read_index()

    def blob(self, version: str) -> Path:
        return self.blobs / version

    def commit(self, name: str, version: str, staged: Path, record: dict[str, object]) -> Path:
        """Move a validated staging dir into the blob store (unless that version is already there)
        and point `name` at it. Identical bytes are stored once."""
        target = self.blob(version)
        with self._lock:
            if not target.is_dir():
                for fname in FILES:
                    with open(staged / fname, "rb") as f:
                        os.fsync(f.fileno())
                write_atomic(staged / "record.json", json.dumps(record, indent=1).encode())
                _fsync_dir(staged)
                os.replace(staged, target)
                _fsync_dir(self.blobs)
            else:
                shutil.rmtree(staged, ignore_errors=True)
            index = self._read_index()
            index[name] = version
            write_atomic(self._index, json.dumps(index, indent=1, sort_keys=True).encode())
        return target

    def remove(self, name: str) -> None:
        with self._lock:
            index = self._read_index()
            if index.pop(name, None) is not None:
                write_atomic(self._index, json.dumps(index, indent=1, sort_keys=True).encode())

    def record(self, version: str) -> dict[str, object]:
        data: dict[str, object] = json.loads((self.blob(version) / "record.json").read_text())
        return data

    def collect_garbage(self) -> None:
        live = set(self.names().values())
        for blob in self.blobs.iterdir():
            if blob.name not in live:
                log.info("removing unreferenced adapter blob %s", blob.name[:12])
                shutil.rmtree(blob, ignore_errors=True)

    def _read_index(self) -> dict[str, str]:
        if not self._index.is_file():
            return {}
        data = json.loads(self._index.read_text())
        return {str(k): str(v) for k, v in data.items()}
