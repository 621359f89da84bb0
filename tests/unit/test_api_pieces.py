"""Auth key scopes, structured logs and name bounds, without a server."""

from __future__ import annotations

import json
import logging

import pytest
from pydantic import ValidationError

from server.api.adapter_routes import LoadLoraRequest, UnloadLoraRequest
from server.api.auth import KeyRing
from server.api.logs import JsonFormatter
from server.api.schemas import AdapterPart
from server.lora.registry import MAX_NAME_LENGTH, NAME_RE


def test_key_scopes() -> None:
    keys = KeyRing(["inf-1", "inf-2"], ["adm"])
    assert not keys.open
    assert keys.scope_of("inf-2") == "inference"
    assert keys.scope_of("adm") == "admin"
    assert keys.scope_of("adm ") is None and keys.scope_of("") is None and keys.scope_of("inf") is None
    assert KeyRing([], []).open


def test_json_log_lines_carry_the_request_id() -> None:
    record = logging.LogRecord(
        "loraplex.access", logging.INFO, __file__, 1, "POST %s %d", ("/v1/x", 200), None
    )
    record.request_id = "abc-123"
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "POST /v1/x 200"
    assert line["request_id"] == "abc-123" and line["level"] == "info" and line["logger"] == "loraplex.access"
    assert line["time"].endswith("Z")


def test_every_name_field_takes_the_longest_name_the_registry_does() -> None:
    """A namespaced name of 64 + 1 + 64 characters is valid in the registry, so every request field
    naming an adapter must take it (vLLM's load/unload routes once stopped at 64)."""
    longest = "t" * 64 + "/" + "a" * 64
    assert NAME_RE.match(longest) and len(longest) == MAX_NAME_LENGTH
    assert LoadLoraRequest(lora_name=longest, lora_path="/x").lora_name == longest
    assert UnloadLoraRequest(lora_name=longest).lora_name == longest
    assert AdapterPart(name=longest, scale=1.0).name == longest
    with pytest.raises(ValidationError):
        UnloadLoraRequest(lora_name=longest + "a")
