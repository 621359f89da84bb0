"""Adapter names -> versions -> files. A version is the sha256 of the adapter's two files, so the
same bytes are the same version and a request pinned to a version never sees other weights."""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from server.errors import AdapterError, AdapterNotFoundError, AdapterWeightsError
from server.lora.adapter import AdapterWeights, ConfigReport, LinearShape
from server.lora.store import FILES, AdapterStore

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


def check_name(name: str) -> None:
    if not NAME_RE.match(name):
        raise AdapterError(
            f"invalid adapter name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
            "name",
        )


@dataclass(frozen=True, slots=True)
class AdapterRecord:
    name: str
    version: str
    path: Path
    rank: int
    target_modules: tuple[str, ...]
    size_bytes: int
    report: ConfigReport
    created: float = 0.0

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "version": self.version,
            "rank": self.rank,
            "target_modules": list(self.target_modules),
            "size_bytes": self.size_bytes,
            "created": int(self.created),
            "report": asdict(self.report),
        }


@dataclass(slots=True)
class AdapterUsage:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(slots=True)
class _Usage:
    by_name: dict[str, AdapterUsage] = field(default_factory=dict)


class AdapterRegistry:
    """Names -> current version. With a store, adapters are copied into it and survive a restart;
    without one (tests, benchmarks) directories are served in place."""

    def __init__(
        self, base_shapes: dict[str, LinearShape], max_rank: int, store: AdapterStore | None = None
    ) -> None:
        self.base_shapes = base_shapes
        self.max_rank = max_rank
        self.store = store
        self._records: dict[str, AdapterRecord] = {}
        self._usage = _Usage()
        self._lock = threading.Lock()

    def load(self, record: AdapterRecord) -> AdapterWeights:
        """Parse an adapter from disk (called by the CPU cache's loader thread)."""
        from server.lora.weights import load_adapter

        if adapter_version(record.path) != record.version:
            raise AdapterWeightsError(f"adapter {record.name!r} changed on disk since it was registered")
        return load_adapter(record.path, self.base_shapes, self.max_rank)

    def add_dir(
        self, name: str, directory: Path, *, staged: bool = False
    ) -> tuple[AdapterRecord, AdapterWeights]:
        """Validate a PEFT adapter directory completely and register it under `name`.

        With a store, only the two adapter files are copied in (a `staged` dir, already inside the
        store's staging area, is moved instead). Nothing is stored unless validation passed."""
        from server.lora.weights import load_adapter

        check_name(name)
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
            created=time.time(),
        )
        if self.store is not None:
            if not staged:
                copy = self.store.new_staging_dir()
                for fname in FILES:
                    shutil.copyfile(directory / fname, copy / fname)
                directory = copy
            path = self.store.commit(name, version, directory, record.to_json())
            record = replace(record, path=path)
        with self._lock:
            self._records[name] = record
        log.info("adapter %s registered (version %s, rank %d)", name, version[:12], record.rank)
        return record, weights

    def restore(self) -> list[AdapterRecord]:
        """Re-register everything the store knows (after a restart), from the records written at
        import time, without parsing the weights again."""
        if self.store is None:
            return []
        restored = []
        for name, version in self.store.names().items():
            try:
                data = self.store.record(version)
                report = data.get("report") or {}
                targets = data["target_modules"]
                assert isinstance(report, dict) and isinstance(targets, list)
                record = AdapterRecord(
                    name=name,
                    version=version,
                    path=self.store.blob(version),
                    rank=int(str(data["rank"])),
                    target_modules=tuple(str(t) for t in targets),
                    size_bytes=int(str(data["size_bytes"])),
                    report=ConfigReport(**report),
                    created=float(str(data.get("created", 0))),
                )
            except (OSError, KeyError, ValueError, AssertionError, TypeError) as e:
                log.error("adapter %s in the store is unreadable, skipped: %s", name, e)
                continue
            with self._lock:
                self._records[name] = record
            restored.append(record)
        self.store.collect_garbage()
        return restored

    def record_usage(self, name: str, prompt_tokens: int, completion_tokens: int) -> None:
        with self._lock:
            u = self._usage.by_name.setdefault(name, AdapterUsage())
            u.requests += 1
            u.prompt_tokens += prompt_tokens
            u.completion_tokens += completion_tokens

    def usage(self, name: str) -> AdapterUsage:
        with self._lock:
            u = self._usage.by_name.get(name, AdapterUsage())
            return AdapterUsage(u.requests, u.prompt_tokens, u.completion_tokens)

    def scan(self, root: Path) -> list[AdapterRecord]:
        """Register every adapter directory directly under `root` (unchanged ones are skipped);
        a bad one is logged and skipped."""
        records = []
        for d in sorted(p for p in root.iterdir() if (p / CONFIG_FILE).is_file()):
            current = self.get(d.name)
            try:
                if current is not None and current.version == adapter_version(d):
                    continue
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
        """Forget the name. Requests already running keep their version's files until restart."""
        with self._lock:
            record = self._records.pop(name, None)
        if record is None:
            raise AdapterNotFoundError(name)
        if self.store is not None:
            self.store.remove(name)
        return record

    def get(self, name: str) -> AdapterRecord | None:
        with self._lock:
            return self._records.get(name)

    def records(self) -> list[AdapterRecord]:
        with self._lock:
            return sorted(self._records.values(), key=lambda r: r.name)
