"""The persona chat page (no auth: the page itself holds no data; its API calls carry the key the
person types in). `GET /` is the page, `/static/*` its script and style sheet."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

WEB_DIR = Path(__file__).parent.parent / "web"
NO_CACHE = {"Cache-Control": "no-cache"}

router = APIRouter()


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(WEB_DIR / "index.html", media_type="text/html", headers=NO_CACHE)


class _NoCacheStatic(StaticFiles):
    """Static files revalidated on every load, so a new server version never runs an old script."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(NO_CACHE)
        return response


def static_files() -> StaticFiles:
    return _NoCacheStatic(directory=WEB_DIR)
