"""Adapter management (admin scope): multipart upload, list, inspect, delete, and vLLM's
load/unload endpoints restricted to configured import directories."""

from __future__ import annotations

import shutil
from pathlib import Path, PurePosixPath
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile

from server.api import responses
from server.api.auth import AuthError, check_manageable, grant, require
from server.api.responses import ADMIN, JSON_BODY, answers
from server.api.schemas import ADAPTER_NAME
from server.errors import AdapterError, AdapterNotFoundError, AdapterWeightsError
from server.lora.killpoints import reached
from server.lora.registry import MAX_NAME_LENGTH, AdapterRecord, check_name
from server.lora.store import FILES, AdapterStore
from server.lora.weights import PICKLE_SUFFIXES
from server.runtime import Runtime

router = APIRouter(dependencies=[Depends(require("admin"))])


def _rt(request: Request) -> Runtime:
    rt: Runtime = request.app.state.runtime
    return rt


def _store(rt: Runtime) -> AdapterStore:
    assert rt.registry.store is not None, "the server always runs with a store"
    return rt.registry.store


def describe(rt: Runtime, record: AdapterRecord) -> dict[str, Any]:
    engine = rt.engine
    if record.version in engine.slots.slot_of:
        tier = "device"
    elif record.version in engine.cache:
        tier = "cpu"
    else:
        tier = "disk"
    usage = rt.registry.usage(record.name)
    return {
        "object": "adapter",
        **record.to_json(),
        "parent": rt.model_id,
        "tier": tier,
        "requests": usage.requests,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
    }


def _check_new_name(request: Request, rt: Runtime, name: str) -> None:
    check_name(name)
    check_manageable(request, name)
    if rt.is_base(name):
        raise AdapterError(f"{name!r} is the base model's id; choose another adapter name", "name")


def _check_visible(request: Request, name: str) -> None:
    """Another tenant's adapter is, to this key, an unknown name: the same 404, byte for byte."""
    if not grant(request).may_use(name):
        raise AdapterNotFoundError(name)


def _role(field: str, upload: UploadFile) -> str:
    """Which adapter file a multipart part is: by field name, else by the client's file name (only
    its last component is looked at, and only to compare; it never becomes a path)."""
    filename = PurePosixPath((upload.filename or "").replace("\\", "/")).name
    for candidate in (field, filename):
        if candidate.lower().endswith(PICKLE_SUFFIXES):
            raise AdapterWeightsError(
                f"{candidate!r} is a pickle file; pickle weights are never loaded. Convert the adapter "
                "to adapter_model.safetensors (PEFT: save_pretrained(..., safe_serialization=True)).",
                candidate,
            )
        if candidate in FILES:
            return candidate
    raise AdapterError(
        f"unexpected file part {field!r}: send adapter_config.json and adapter_model.safetensors", field
    )


# The form upload() reads itself (streamed to disk), described for the document
UPLOAD_FORM = {
    "type": "object",
    "required": ["name", *FILES],
    "properties": {
        "name": {"type": "string", ADAPTER_NAME: True},
        **{f: {"type": "string", "format": "binary"} for f in FILES},
    },
}


@router.post(
    "/v1/adapters",
    status_code=201,
    response_model=None,
    responses={
        **answers(responses.Adapter, 400, 408, 413, 415, *ADMIN, status=201),
        200: {"model": responses.Adapter, "description": "these bytes were already stored under this name"},
    },
    openapi_extra={
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": UPLOAD_FORM}}}
    },
)
async def upload(request: Request) -> JSONResponse:
    rt = _rt(request)
    store = _store(rt)
    async with request.form(max_files=2, max_fields=4) as form:
        name = form.get("name")
        if not isinstance(name, str):
            raise AdapterError("the form field 'name' is required", "name")
        _check_new_name(request, rt, name)
        parts: dict[str, UploadFile] = {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                role = _role(key, value)
                if role in parts:
                    raise AdapterError(f"{role} was sent twice", role)
                parts[role] = value
        missing = [f for f in FILES if f not in parts]
        if missing:
            raise AdapterError(f"missing file(s): {', '.join(missing)}", missing[0])
        staged = store.new_staging_dir()
        try:
            for role, part in parts.items():
                with open(staged / role, "wb") as out:
                    while chunk := await part.read(1 << 20):
                        out.write(chunk)
                        reached("upload-body")  # test-only kill point (killpoints.py)
            previous = rt.registry.get(name)
            record, _ = await run_in_threadpool(rt.registry.add_dir, name, staged, staged=True)
        finally:
            shutil.rmtree(staged, ignore_errors=True)  # gone already when committed
    unchanged = previous is not None and previous.version == record.version
    reached("upload-done")  # test-only kill point (killpoints.py)
    return JSONResponse(describe(rt, record), status_code=200 if unchanged else 201)


@router.get("/v1/adapters", response_model=None, responses=answers(responses.AdapterList, *ADMIN))
async def list_adapters(request: Request) -> dict[str, Any]:
    rt = _rt(request)
    may_use = grant(request).may_use
    return {"object": "list", "data": [describe(rt, r) for r in rt.registry.records() if may_use(r.name)]}


@router.get(
    "/v1/adapters/{name:path}", response_model=None, responses=answers(responses.Adapter, *ADMIN, 404)
)
async def get_adapter(name: str, request: Request) -> dict[str, Any]:
    rt = _rt(request)
    _check_visible(request, name)
    return describe(rt, rt.registry.resolve(name))


@router.delete(
    "/v1/adapters/{name:path}",
    response_model=None,
    responses=answers(responses.AdapterDeleted, *ADMIN, 404),
)
async def delete_adapter(name: str, request: Request) -> dict[str, Any]:
    rt = _rt(request)
    _check_visible(request, name)
    record = rt.registry.remove(name)
    return {"id": record.name, "object": "adapter", "version": record.version, "deleted": True}


class LoadLoraRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    lora_name: str = Field(max_length=MAX_NAME_LENGTH, json_schema_extra={ADAPTER_NAME: True})
    # NUL: the OS refuses such a path (ValueError from Path.resolve), so the request is refused first
    lora_path: str = Field(
        max_length=4096, pattern=r"^[^\x00]*$", description="inside one of --adapter-import-dirs, else 403"
    )


class UnloadLoraRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    lora_name: str = Field(max_length=MAX_NAME_LENGTH)


def _inside_import_dirs(rt: Runtime, path: Path) -> Path:
    """The resolved path (symlinks followed) if it lies inside an --adapter-import-dirs entry."""
    roots = [Path(d).resolve() for d in rt.settings.split(rt.settings.adapter_import_dirs)]
    resolved = path.resolve()
    if not any(resolved.is_relative_to(root) for root in roots):
        raise AuthError(f"lora_path {str(path)!r} is outside the directories in --adapter-import-dirs", 403)
    return resolved


@router.post(
    "/v1/load_lora_adapter",
    response_model=None,
    response_class=PlainTextResponse,
    responses=answers(None, *JSON_BODY, *ADMIN, text="Success: LoRA adapter 'NAME' added successfully."),
)
async def load_lora_adapter(body: LoadLoraRequest, request: Request) -> PlainTextResponse:
    rt = _rt(request)
    _check_new_name(request, rt, body.lora_name)
    source = _inside_import_dirs(rt, Path(body.lora_path))
    files = {f: _inside_import_dirs(rt, source / f) for f in FILES}  # a file may not link outside either
    staged = _store(rt).new_staging_dir()
    try:
        for fname, path in files.items():
            if not path.is_file():
                raise AdapterError(f"{fname} not found in {body.lora_path!r}", fname)
            shutil.copyfile(path, staged / fname)
        await run_in_threadpool(rt.registry.add_dir, body.lora_name, staged, staged=True)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post(
    "/v1/unload_lora_adapter",
    response_model=None,
    response_class=PlainTextResponse,
    responses=answers(
        None, *JSON_BODY, *ADMIN, 404, text="Success: LoRA adapter 'NAME' removed successfully."
    ),
)
async def unload_lora_adapter(body: UnloadLoraRequest, request: Request) -> PlainTextResponse:
    _check_visible(request, body.lora_name)
    _rt(request).registry.remove(body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
