"""Auth key scopes and structured logs, without a server."""

from __future__ import annotations

import json
import logging

from server.api.auth import KeyRing
from server.api.logs import JsonFormatter


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
