"""vLLM's `--lora-modules`: adapters the operator names at start, each `name=path` or a JSON object
`{"name": ..., "path": ..., "base_model_name": ...}` (base_model_name is accepted and not used:
this server has one base model). Unlike `--import-adapters`, which skips a bad directory with a log
line, a named adapter that cannot be registered stops the start: the operator asked for it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from server.errors import AdapterError, StartupAdapterError
from server.lora.registry import AdapterRecord, AdapterRegistry

_KEYS = frozenset({"name", "path", "base_model_name"})
_FLAG = "--lora-modules"


def parse(entries: list[str]) -> list[tuple[str, Path]]:
    """(name, directory) of each entry, in order; StartupAdapterError names a malformed one."""
    out: list[tuple[str, Path]] = []
    for entry in entries:
        if entry.lstrip().startswith("{"):
            try:
                obj = json.loads(entry)
            except json.JSONDecodeError as e:
                raise StartupAdapterError(f"{_FLAG} {entry!r}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or set(obj) - _KEYS:
                what = f"unknown {sorted(set(obj) - _KEYS)}" if isinstance(obj, dict) else "not an object"
                raise StartupAdapterError(f"{_FLAG} {entry!r}: takes name, path, base_model_name ({what})")
            name, path = obj.get("name"), obj.get("path")
        else:
            name, sep, path = entry.partition("=")
            if not sep:
                raise StartupAdapterError(f"{_FLAG} {entry!r}: expected name=path")
        if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
            raise StartupAdapterError(f"{_FLAG} {entry!r}: needs a name and a path")
        if name in (n for n, _ in out):
            raise StartupAdapterError(f"{_FLAG}: {name!r} is named twice")
        out.append((name, Path(path).expanduser()))
    return out


def check(entries: list[str], base_names: Sequence[str] = ()) -> list[tuple[str, Path]]:
    """What can be checked before the model loads (a typo should not cost a model load): the form,
    that each directory exists, and that no name is one of the base model's ids."""
    named = parse(entries)
    for name, directory in named:
        if name in base_names:
            raise StartupAdapterError(f"{_FLAG} {name!r} is the base model's id; choose another name")
        if not directory.is_dir():
            raise StartupAdapterError(f"{_FLAG} {name}={directory}: not a directory")
    return named


def register(registry: AdapterRegistry, named: list[tuple[str, Path]]) -> list[AdapterRecord]:
    """Validate and register every checked entry (an unchanged one keeps its version)."""
    records = []
    for name, directory in named:
        try:
            records.append(registry.add_dir(name, directory)[0])
        except AdapterError as e:
            raise StartupAdapterError(f"{_FLAG} {name}={directory}: {e}") from None
        except OSError as e:  # unreadable files: the operator's to fix, not a traceback
            raise StartupAdapterError(f"{_FLAG} {name}={directory}: {e.strerror} ({e.filename})") from None
    return records
