"""Adapter names -> versions -> files. A version is the sha256 of the adapter's two files, so the
same bytes are the same version and a request pinned to a version never sees other weights.

Semantics with a store shared by several processes (store.py has the layout): this process's view
of the names converges to the store's by `sync()` (run every `store_rescan_seconds`) and, for a
name it does not know yet, by looking it up on disk before answering 404 (vLLM's resolver). A
request keeps the AdapterRecord it resolved, so a replacement or a deletion seen by a rescan never
changes what a running request uses; `pin()`/`unpin()` tell every process's collector about it."""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from server.errors import AdapterError, AdapterNotFoundError, AdapterWeightsError
from server.lora.adapter import AdapterWeights, ConfigReport, LinearShape, ModelDims, check_factor_range
from server.lora.combination import CAT, Combination
from server.lora.saved import SaveableModule
from server.lora.store import FILES, GC_INTERVAL_SECONDS, AdapterStore

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# An optional namespace ("team-a/support"), one level, so that tenant keys can be scoped by pattern
NAME_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]{0,63}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
MAX_NAME_LENGTH = 64 + 1 + 64  # what NAME_RE admits: the schemas' bound on every name field
# The versions of per-request mixes (mixing.py): never a blob's sha256, so never in the store
MIX_VERSION_PREFIX = "mix-"


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
            "starting with a letter or digit, optionally after a namespace of the same form and a "
            "'/' (team-a/support)",
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
    method: str = "lora"  # AdapterWeights.method: whether it can be mixed is known before a load
    saved_modules: tuple[str, ...] = ()  # modules its modules_to_save copies replace (not mixable either)
    virtual_tokens: int = 0  # prompt, P- and prefix tuning: positions a request gets before its prompt
    # A per-request mix (mixing.py): its parts and their weights, in name order; () for a stored adapter
    parts: tuple[tuple[AdapterRecord, float], ...] = ()
    combination: Combination = CAT  # how a mix's parts combine

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "version": self.version,
            "rank": self.rank,
            "target_modules": list(self.target_modules),
            "size_bytes": self.size_bytes,
            "created": int(self.created),
            "method": self.method,
            "saved_modules": list(self.saved_modules),
            "virtual_tokens": self.virtual_tokens,
            "report": asdict(self.report),
        }

    @classmethod
    def from_json(cls, name: str, version: str, path: Path, data: dict[str, object]) -> AdapterRecord:
        """The inverse of to_json (the record.json a store keeps beside each blob)."""
        report = data.get("report") or {}
        targets = data["target_modules"]
        if not isinstance(report, dict) or not isinstance(targets, list):
            raise ValueError("report or target_modules is malformed")
        return cls(
            name=name,
            version=version,
            path=path,
            rank=int(str(data["rank"])),
            target_modules=tuple(str(t) for t in targets),
            size_bytes=int(str(data["size_bytes"])),
            report=ConfigReport(**report),
            created=float(str(data.get("created", 0))),
            # records written before `method` existed: DoRA and (IA)3 were refused then
            method=str(data.get("method", "lora")),
            saved_modules=tuple(str(m) for m in _list(data.get("saved_modules", []))),
            virtual_tokens=int(str(data.get("virtual_tokens", 0))),
        )


def _list(value: object) -> list[object]:
    if not isinstance(value, list):
        raise ValueError("saved_modules is malformed")
    return value


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
        self,
        base_shapes: dict[str, LinearShape],
        max_rank: int,
        store: AdapterStore | None = None,
        *,
        saveable: dict[str, SaveableModule] | None = None,
        max_saved_bytes: int = 0,
        dims: ModelDims | None = None,
        factor_dtype: torch.dtype = torch.float32,
    ) -> None:
        """`saveable` and `max_saved_bytes`: the modules a modules_to_save copy may replace, and how
        many bytes one adapter's copies may take (none are accepted without them). `dims`: the
        base's sizes, needed to accept prompt, P- and prefix tuning adapters. `factor_dtype`: what the
        device slots hold the factors in (--lora-dtype): a factor beyond its range is refused."""
        self.base_shapes = base_shapes
        self.max_rank = max_rank
        self.saveable = saveable or {}
        self.max_saved_bytes = max_saved_bytes
        self.dims = dims
        self.factor_dtype = factor_dtype
        self.store = store
        self._records: dict[str, AdapterRecord] = {}
        self._usage = _Usage()
        self._lock = threading.Lock()
        # A logical clock of this process's own adds and removes, per name: a rescan or a lookup that
        # read the disk before one of them must not overwrite it with what it read.
        self._tick = 0
        self._touched: dict[str, int] = {}
        self._unreadable: set[tuple[str, str]] = set()  # logged once each
        self._sync_lock = threading.Lock()  # one sync pass at a time; close() waits for it
        self._next_gc = 0.0

    def load(self, record: AdapterRecord) -> AdapterWeights:
        """Parse an adapter from disk (called by the CPU cache's loader thread); a mix is built from
        its parts, each read from disk here (the mix itself is what the CPU cache keeps)."""
        if record.parts:
            from server.lora.mixing import combine

            parts = [(p.name, self.load(p), w) for p, w in record.parts]
            mixed = combine(parts, self.max_rank, record.combination)
            check_factor_range(mixed, self.factor_dtype)
            return mixed
        if adapter_version(record.path) != record.version:
            raise AdapterWeightsError(f"adapter {record.name!r} changed on disk since it was registered")
        return self._parse(record.path)

    def _parse(self, directory: Path) -> AdapterWeights:
        from server.lora.weights import load_adapter

        weights = load_adapter(
            directory, self.base_shapes, self.max_rank, self.saveable, self.max_saved_bytes, self.dims
        )
        check_factor_range(weights, self.factor_dtype)
        return weights

    def add_dir(
        self, name: str, directory: Path, *, staged: bool = False
    ) -> tuple[AdapterRecord, AdapterWeights]:
        """Validate a PEFT adapter directory completely and register it under `name`.

        With a store, only the two adapter files are copied in (a `staged` dir, already inside the
        store's staging area, is moved instead). Nothing is stored unless validation passed."""
        check_name(name)
        version = adapter_version(directory)
        weights = self._parse(directory)
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
            method=weights.method,
            saved_modules=tuple(weights.saved),
            virtual_tokens=weights.virtual.count if weights.virtual is not None else 0,
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
            self._stamp(name)
        log.info("adapter %s registered (version %s, rank %d)", name, version[:12], record.rank)
        return record, weights

    def restore(self) -> list[AdapterRecord]:
        """Register everything the store names (after a restart), from the records written at
        import time, without parsing the weights again; then collect garbage: at once when no other
        process uses the store (as a lone process always did), else after the grace period."""
        if self.store is None:
            return []
        self._rescan()
        self.store.collect_garbage(grace=0.0 if self.store.alone() else None)
        self._next_gc = time.monotonic() + GC_INTERVAL_SECONDS
        return self.records()

    def sync(self) -> list[str]:
        """One pass of the shared-store loop: heartbeat, rescan the names (returns those that
        changed here), and every GC_INTERVAL_SECONDS a garbage collection with the grace period."""
        if self.store is None:
            return []
        with self._sync_lock:
            self.store.heartbeat()
            changed = self._rescan()
            if time.monotonic() >= self._next_gc:
                self._next_gc = time.monotonic() + GC_INTERVAL_SECONDS
                self.store.collect_garbage()
        return changed

    def _rescan(self) -> list[str]:
        assert self.store is not None
        with self._lock:
            start = self._tick
            current = {name: r.version for name, r in self._records.items()}
        on_disk = self.store.names()
        fresh = {}
        for name, version in on_disk.items():
            if current.get(name) != version and (record := self._from_store(name, version)) is not None:
                fresh[name] = record
        changed = []
        with self._lock:
            for name in (current.keys() - on_disk.keys()) | fresh.keys():
                if self._touched.get(name, 0) > start:
                    continue  # added or removed here during this pass: newer than what we read
                if name in fresh:
                    self._records[name] = fresh[name]
                else:
                    self._records.pop(name, None)
                changed.append(name)
        if changed:
            log.info("store rescan: %s changed", ", ".join(sorted(changed)))
        return sorted(changed)

    def _from_store(self, name: str, version: str) -> AdapterRecord | None:
        assert self.store is not None
        if not NAME_RE.match(name):
            return None
        try:
            return AdapterRecord.from_json(
                name, version, self.store.blob(version), self.store.record(version)
            )
        except (OSError, KeyError, ValueError, TypeError) as e:
            if (name, version) not in self._unreadable:
                self._unreadable.add((name, version))
                log.error("adapter %s in the store is unreadable, skipped: %s", name, e)
            return None

    def _stamp(self, name: str) -> None:
        """Record a local add or remove of `name` (the caller holds self._lock)."""
        self._tick += 1
        self._touched[name] = self._tick

    def pin(self, version: str) -> None:
        """A sequence on `version` was admitted here: no collector may remove its blob meanwhile.
        A mix has no blob: its weights are in memory from admission on, and its parts' files were read
        when it was built, before admission, inside the grace period as any adapter's are."""
        if self.store is not None and not version.startswith(MIX_VERSION_PREFIX):
            self.store.pins.pin(version)

    def unpin(self, version: str) -> None:
        """A sequence on `version` left the engine (the pin goes with the last one)."""
        if self.store is not None and not version.startswith(MIX_VERSION_PREFIX):
            self.store.pins.unpin(version)

    def close(self) -> None:
        """Remove this process's pins and staging dir from the store (at shutdown)."""
        with self._sync_lock:
            if self.store is not None:
                self.store.close()

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
        """The current record of `name`. A name unknown here is looked up in the store first: another
        process may have added it since the last rescan."""
        with self._lock:
            record = self._records.get(name)
            start = self._tick
        if record is None and self.store is not None and NAME_RE.match(name):
            version = self.store.pointer(name)
            found = self._from_store(name, version) if version is not None else None
            if found is not None:
                with self._lock:
                    if self._touched.get(name, 0) <= start:  # not removed here since we read it
                        self._records.setdefault(name, found)
                    record = self._records.get(name)
        if record is None:
            raise AdapterNotFoundError(name)
        return record

    def remove(self, name: str) -> AdapterRecord:
        """Forget the name, here and in the store. Requests already running keep their version:
        its blob is only collected once unpinned and past the grace period."""
        record = self.get(name)
        if self.store is not None:
            # the pointer goes first: a lookup that reads the disk after our stamp finds nothing
            version = self.store.remove(name)
            if record is None and version is not None:
                record = self._from_store(name, version)
        with self._lock:
            record = self._records.pop(name, None) or record
            self._stamp(name)
        if record is None:
            raise AdapterNotFoundError(name)
        return record

    def get(self, name: str) -> AdapterRecord | None:
        with self._lock:
            return self._records.get(name)

    def records(self) -> list[AdapterRecord]:
        with self._lock:
            return sorted(self._records.values(), key=lambda r: r.name)
