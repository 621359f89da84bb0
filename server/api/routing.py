"""Which methods a request's path answers, from the app's own routes: the `Allow` of a 405, and the
question an edge check asks before it judges a body (a method the path does not answer is a 405,
whatever its Content-Type). Starlette's router only knows the first route whose path matches, and
GET and POST of one path are two routes here."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from starlette.routing import BaseRoute, Match, Mount
from starlette.types import Scope

_flat: Callable[[Sequence[BaseRoute]], Iterable[Any]]
try:  # newer FastAPI keeps included routers nested; this walks them as the router does
    from fastapi.routing import iter_route_contexts as _flat
except ImportError:  # older FastAPI copies every route into the app's list
    _flat = iter


def allowed_methods(routes: Sequence[BaseRoute], scope: Scope) -> set[str] | None:
    """The methods of every route whose path matches `scope`'s; None when no route's path does
    (a 404, or a mount such as /static that answers for itself)."""
    methods: set[str] = set()
    for route in _flat(routes):
        match, _ = route.matches(scope)
        if match is Match.NONE:
            continue
        route_methods = getattr(route, "methods", None)
        if isinstance(getattr(route, "original_route", route), Mount) or route_methods is None:
            return None
        methods |= set(route_methods)
    return methods or None


def not_allowed(scope: Scope) -> str | None:
    """The Allow header of a 405 when the path is routed and the method is not one of its routes';
    None otherwise (allowed, a 404, or a mount that answers for itself)."""
    router = getattr(scope.get("app"), "router", None)
    if router is None:
        return None
    methods = allowed_methods(router.routes, scope)
    if methods is None or scope["method"] in methods:
        return None
    return ", ".join(sorted(methods))
