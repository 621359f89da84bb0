"""Adapter names -> versions -> files. A version is the sha256 of the adapter's two files, so the
same bytes are the same version and a request pinned to a version never sees other weights."""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from server.errors import AdapterError, AdapterNotFoundError, AdapterWeightsError
from server.lora.adapter import AdapterWeights, ConfigReport, LinearShape

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def adapter_version(directory: Path) -> str:
    h = hashlib.sha256()
    for fname in (CONFIG_FILE, WEIGHTS_FILE):
        path = directory / fname
        if not path.is_file():
            raise AdapterWeightsError(f"{fname} is missing from adapter directory {directory.name!r}", fname)
        h.update(fname.encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


@dataclass(frozen=True, slots=True)
class AdapterRecord:
    name: str
    version: str
    path: Path
    rank: int
    target_modules: tuple[str, ...]
    size_bytes: int
    report: ConfigReport


class AdapterRegistry:
    def __init__(self, base_shapes: dict[str, LinearShape], max_rank: int) -> None:
        self.base_shapes = base_shapes
        self.max_rank = max_rank
        self._records: dict[str, AdapterRecord] = {}
        self._lock = threading.Lock()

    def load(self, record: AdapterRecord) -> AdapterWeights:
        """Parse an adapter from disk (called by the CPU cache's loader thread)."""
        from server.lora.weights import load_adapter

        if adapter_version(record.path) != record.version:
            raise AdapterWeightsError(f"adapter {record.name!r} changed on disk since it was registered")
        return load_adapter(record.path, self.base_shapes, self.max_rank)

    def add_dir(self, name: str, directory: Path) -> tuple[AdapterRecord, AdapterWeights]:
        """Validate a PEFT adapter directory completely and register it under `name`."""
        from server.lora.weights import load_adapter

        if not NAME_RE.match(name):
            raise AdapterError(
                f"invalid adapter name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit",
                "name",
            )
        version = adapter_version(directory)
        weights = load_adapter(directory, self.base_shapes, self.max_rank)
        size = sum((directory / f).stat().st_size for f in (CONFIG_FILE, WEIGHTS_FILE))
        record = AdapterRecord(
            name=name,
            version=version,
            path=directory,
            rank=weights.max_rank,
            target_modules=tuple(weights.target_modules),
            size_bytes=size,
            report=weights.report,
        )
        with self._lock:
            self._records[name] = record
        log.info("adapter %s registered (version %s, rank %d)", name, version[:12], record.rank)
        return record, weights

    def scan(self, root: Path) -> list[AdapterRecord]:
        """Register every adapter directory directly under `root`; a bad one is logged and skipped."""
        records = []
        for d in sorted(p for p in root.iterdir() if (p / CONFIG_FILE).is_file()):
            try:
                records.append(self.add_dir(d.name, d)[0])
            except AdapterError as e:
                log.error("skipping adapter %s: %s", d.name, e)
        return records

    def resolve(self, name: str) -> AdapterRecord:
        with self._lock:
            record = self._records.get(name)
        if record is None:
            raise AdapterNotFoundError(name)
        return record

    def remove(self, name: str) -> AdapterRecord:
        with self._lock:
            record = self._records.pop(name, None)
        if record is None:
            raise AdapterNotFoundError(name)
        return record

    def records(self) -> list[AdapterRecord]:
        with self._lock:
            return sorted(self._records.values(), key=lambda r: r.name)
