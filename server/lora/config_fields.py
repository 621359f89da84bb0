"""Field parsers shared by every PEFT method's config reader: strict JSON, module matchers, and
user regexes checked for catastrophic backtracking before they are compiled."""

from __future__ import annotations

import importlib
import json
import re
import sys
from collections.abc import Iterator
from typing import Any

from server.errors import AdapterConfigError
from server.lora.adapter import ConfigReport

MAX_CONFIG_BYTES = 64 * 1024
# PEFT's own configs nest three deep (loftq_config, rank_pattern); deeper is not a LoRA config, and
# nesting is what makes a small file costly to walk (json.loads alone takes ~1000 levels)
MAX_CONFIG_DEPTH = 16
ALL_LINEAR = "all-linear"
# User regexes are matched against every module name: refuse shapes that backtrack exponentially.
_MAX_PATTERN_CHARS = 1024
_MAX_UNBOUNDED_REPEATS = 4
_sre: Any = importlib.import_module("re._parser" if sys.version_info >= (3, 11) else "sre_parse")
_REPEATS = tuple(
    getattr(_sre, op) for op in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT") if hasattr(_sre, op)
)

Matcher = frozenset[str] | re.Pattern[str]
# Keys every PEFT method's config carries that change nothing in how the adapter is applied
INFORMATIONAL: dict[str, str] = {
    "task_type": "informational: loraplex runs the base model as a causal LM",
    "base_model_name_or_path": "informational: the adapter is applied to this server's base model",
    "revision": "informational: nothing is downloaded",
    "peft_version": "informational",
    "auto_mapping": "informational: never used to import anything",
    "inference_mode": "informational: loraplex only runs inference",
}


class Refusal(Exception):
    """One field is refused; collected so that the uploader sees every problem at once."""


class AdapterConfigRefusedError(AdapterConfigError):
    """A readable config that asks for something loraplex refuses; `report` says what was refused and why."""

    def __init__(self, message: str, field: str, report: ConfigReport) -> None:
        super().__init__(message, field)
        self.report = report


class FieldReader:
    """Reads one config's fields into its report: `reader(key, parse, *extra)` is parse's value, or
    None with the Refusal recorded; `settle` raises with every refusal at once, or records what
    was honoured."""

    def __init__(self, data: dict[str, Any], report: ConfigReport, defaults: dict[str, Any] | None = None):
        self.data = data
        self.report = report
        self.defaults = defaults or {}

    def __call__(self, key: str, parse: Any, *extra: object) -> Any:
        try:
            return parse(self.data.get(key, self.defaults.get(key)), *extra)
        except Refusal as e:
            self.report.refused[key] = f"{key}: {e}"
            return None

    def settle(self, honoured: tuple[str, ...]) -> None:
        report = self.report
        if report.refused:
            problems = "; ".join(report.refused.values())
            raise AdapterConfigRefusedError(
                f"adapter_config.json is refused: {problems}", next(iter(report.refused)), report
            )
        for key in honoured:
            if key in self.data and key not in report.ignored:
                report.honoured[key] = self.data[key]


def load_json(raw: bytes | str | dict[str, object]) -> dict[str, Any]:
    name = "adapter_config.json"  # also the `field` of a whole-file problem: the upload part at fault
    try:
        data = json.dumps(raw).encode() if isinstance(raw, dict) else raw
        data = data.encode() if isinstance(data, str) else data
        if len(data) > MAX_CONFIG_BYTES:
            raise AdapterConfigError(f"{name} is {len(data)} bytes; the limit is {MAX_CONFIG_BYTES}", name)
        text = data.decode("utf-8-sig")
        obj = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except (ValueError, TypeError, RecursionError) as e:  # JSON and Unicode decode errors are ValueErrors
        raise AdapterConfigError(f"{name} is not valid JSON: {e}", name) from None
    if not isinstance(obj, dict):
        raise AdapterConfigError(f"{name} must be a JSON object, got a JSON {type(obj).__name__}", name)
    if _deeper_than(obj, MAX_CONFIG_DEPTH):
        raise AdapterConfigError(
            f"{name} nests objects or arrays deeper than {MAX_CONFIG_DEPTH} levels", name
        )
    return obj


def _deeper_than(obj: object, limit: int) -> bool:
    stack = [(obj, 1)]  # iterative: the depth is the attacker's to choose
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list):
            if depth > limit:
                return True
            stack.extend(
                (child, depth + 1) for child in (value.values() if isinstance(value, dict) else value)
            )
    return False


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise ValueError(f"duplicate key(s) {duplicates}")
    return dict(pairs)


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number")


def short(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def parse_bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise Refusal(f"must be true or false, got {short(value)}")
    return value


def parse_targets(value: object, optional: bool) -> Matcher | None:
    if optional and not value:
        return None
    if value is None:
        raise Refusal("missing: PEFT would pick per-architecture defaults; list the modules explicitly")
    if not value:
        raise Refusal("is empty: the adapter would target no module")
    if isinstance(value, str):
        return None if value.lower() == ALL_LINEAR and not optional else compile_regex(value, value)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise Refusal(f"must be a list of module names or a regex string, got {short(value)}")
    return frozenset(value)


MAX_MODULES_TO_SAVE = 64


def parse_modules_to_save(value: object) -> tuple[str, ...]:
    """PEFT's `modules_to_save`: null or a list of module names, each matched as a suffix of the
    full name (see server.lora.saved.listed)."""
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise Refusal(f"must be a list of module names, got {short(value)}")
    if len(value) > MAX_MODULES_TO_SAVE:
        raise Refusal(f"lists {len(value)} modules; at most {MAX_MODULES_TO_SAVE} are read")
    return tuple(value)


def matches(matcher: Matcher, name: str) -> bool:
    if isinstance(matcher, re.Pattern):
        return matcher.fullmatch(name) is not None
    return name in matcher or any(name.endswith(f".{suffix}") for suffix in matcher)


def compile_regex(fragment: str, full: str) -> re.Pattern[str]:
    """Compile `full` (PEFT's regex built around the user's `fragment`) after a backtracking check on it."""
    try:
        if len(fragment) > _MAX_PATTERN_CHARS:
            raise Refusal(f"is longer than {_MAX_PATTERN_CHARS} characters")
        if _unbounded_repeats(_sre.parse(fragment)) > _MAX_UNBOUNDED_REPEATS:
            raise Refusal(f"has more than {_MAX_UNBOUNDED_REPEATS} unbounded repeats (*, +, {{n,}})")
        return re.compile(full)
    except (re.error, Refusal) as e:
        raise Refusal(f"regex {short(fragment)} is refused: {e}") from None


def _unbounded_repeats(sub: Any, in_loop: bool = False) -> int:
    """Count unbounded repeats; refuse a repeat or an alternation inside one (exponential backtracking)."""
    count = 0
    for op, av in sub:
        if op in _REPEATS:
            _, high, body = av
            unbounded = high == _sre.MAXREPEAT
            if in_loop and high > 1:
                raise Refusal(
                    "nests a repeat inside an unbounded repeat, as in (a+)*: exponential backtracking"
                )
            count += unbounded + _unbounded_repeats(body, in_loop or unbounded)
        elif in_loop and op == _sre.BRANCH:
            raise Refusal(
                "has an alternation inside an unbounded repeat, as in (a|aa)*: exponential backtracking"
            )
        else:
            count += sum(_unbounded_repeats(child, in_loop) for child in _subpatterns(av))
    return count


def _subpatterns(av: object) -> Iterator[Any]:
    if isinstance(av, _sre.SubPattern):
        yield av
    elif isinstance(av, tuple | list):
        for item in av:
            yield from _subpatterns(item)
