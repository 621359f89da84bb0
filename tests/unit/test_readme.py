"""The README's configuration and API tables against the code: a setting or a route added without
its row fails here, not in a user's hands."""

from __future__ import annotations

import re
from pathlib import Path

from fastapi.routing import APIRoute

from server.api import adapter_routes, openai_routes, ops_routes, tokenize_routes, web_routes
from server.cli import SECRET_FIELDS
from server.config import Settings

README = (Path(__file__).parents[2] / "README.md").read_text()


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end > 0 else None]


def test_every_setting_has_a_row_in_the_configuration_table() -> None:
    table = section("Configuration")
    flags = set(re.findall(r"^\| (.*?) \|", table, re.MULTILINE))
    named = {f for cell in flags for f in re.findall(r"`(--[a-z0-9-]+)", cell)}
    missing = [
        n for n in Settings.model_fields if n not in SECRET_FIELDS and "--" + n.replace("_", "-") not in named
    ]
    assert not missing, f"settings without a row in the README's configuration table: {missing}"
    for secret in SECRET_FIELDS:  # environment only: the README names the variable
        assert re.search(rf"\bLORAPLEX_{secret.upper()}\b", README), secret


def test_every_route_is_in_the_api_table() -> None:
    rows = "\n".join(line for line in README.splitlines() if line.startswith("| `") and "/" in line)
    rows = re.sub(r"\{[^}]*\}", "{}", rows)  # a parameter's name may differ: /v1/models/{id}
    routers = (adapter_routes, openai_routes, ops_routes, tokenize_routes, web_routes)
    missing = []
    for module in routers:
        for route in module.router.routes:
            if not isinstance(route, APIRoute) or not route.include_in_schema:
                continue
            path = re.sub(r"\{[^}]*\}", "{}", route.path)
            for method in route.methods or ():
                if f"{method} {path}`" not in rows and f"{method} {path} " not in rows:
                    missing.append(f"{method} {path}")
    assert not missing, f"routes without a row in the README's API table: {missing}"
