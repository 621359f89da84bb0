"""Hostile uploads: malformed safetensors, weights that do not fit the base, configs that are too
big, too deep or ask for what is refused, names and file names that try to reach a path, and
multipart bodies with parts missing, extra or malformed. Every one is a 4xx with nothing stored."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from safetensors.torch import load, save

from tests.e2e.hostile import ADAPTER, MAX_UPLOAD, Case, Ctx, Reply
from tests.e2e.server_proc import ADMIN_KEY

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def split(weights: bytes) -> tuple[dict[str, Any], bytes]:
    """A safetensors file's header (a dict) and its data section."""
    (size,) = struct.unpack("<Q", weights[:8])
    return json.loads(weights[8 : 8 + size]), weights[8 + size :]


def pack(header: dict[str, Any] | bytes, data: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def tensors(ctx: Ctx, edit: Callable[[dict[str, torch.Tensor]], None]) -> Reply:
    """Upload the valid adapter after `edit` changed its tensors (then saved by safetensors itself)."""
    found = {k: v.clone() for k, v in load(ctx.weights).items()}
    edit(found)
    return ctx.upload(weights=save(found))


def header(ctx: Ctx, edit: Callable[[dict[str, Any], list[str]], None]) -> Reply:
    """Upload the valid data section under an edited header (entries in data order)."""
    head, data = split(ctx.weights)
    names = sorted((k for k in head if k != "__metadata__"), key=lambda k: head[k]["data_offsets"][0])
    edit(head, names)
    return ctx.upload(weights=pack(head, data))


def config(ctx: Ctx, **changes: Any) -> Reply:
    return ctx.upload(config=json.dumps(json.loads(ctx.config) | changes).encode())


def first(kind: str) -> Callable[[dict[str, torch.Tensor]], str]:
    return lambda t: next(k for k in sorted(t) if kind in k)


def _shift(head: dict[str, Any], names: list[str], by: int) -> None:
    entry = head[names[1]]
    entry["data_offsets"] = [o + by for o in entry["data_offsets"]]


def _set(t: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
    t[key] = value


def _poke(value: float) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(t: dict[str, torch.Tensor]) -> None:
        t[first("lora_A")(t)][0, 0] = value

    return edit


def _many_entries(ctx: Ctx) -> Reply:
    # 20 000 zero-size tensors (about 1 MiB of header): each one is checked, none is a LoRA factor
    entry = {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
    return ctx.upload(weights=pack({f"t{i}": entry for i in range(20_000)}, b""))


def _duplicate_names(ctx: Ctx) -> Reply:
    head, data = split(ctx.weights)
    name = next(k for k in head if k != "__metadata__")
    raw = json.dumps(head).encode()
    # the same key twice in one JSON object: readers disagree on which one wins
    twice = raw[:-1] + b", " + json.dumps({name: head[name]}).encode()[1:-1] + b"}"
    return ctx.upload(weights=pack(twice, data))


def _filename_traversal(ctx: Ctx) -> Reply:
    # the parts say who they are only by their client file names, which climb out of any directory:
    # the last component names the role and nothing else is used (the same bytes as the adapter
    # already stored: 200, the same version, nothing new on disk)
    return ctx.upload(
        ADAPTER,
        files={
            "a": (f"../../../../tmp/{CONFIG}", ctx.config),
            "b": (f"..\\..\\C:\\{WEIGHTS}", ctx.weights),
        },
    )


def _no_stray_files(ctx: Ctx, reply: Reply) -> None:
    assert reply.json()["name"] == ADAPTER
    assert not any(p.name in (CONFIG, WEIGHTS) for p in ctx.store.parent.iterdir())


def _multipart(ctx: Ctx, content_type: str, body: bytes | Iterator[bytes]) -> Reply:
    return ctx.post("/v1/adapters", ADMIN_KEY, {"Content-Type": content_type}, content=body)


def _chunked_oversized(ctx: Ctx) -> Reply:
    # no Content-Length to refuse up front: the limit is enforced while the body streams in
    boundary = "hostileboundary"
    start = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\nhostile\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="{WEIGHTS}"; filename="{WEIGHTS}"\r\n\r\n'
    ).encode()

    def chunks() -> Iterator[bytes]:
        yield start
        for _ in range(MAX_UPLOAD // 65536 + 2):
            yield b"\0" * 65536

    return _multipart(ctx, f"multipart/form-data; boundary={boundary}", chunks())


def _name(value: str) -> Case:
    return Case(lambda ctx: ctx.upload(value), 400, "invalid_adapter", "name")


W, C = WEIGHTS, CONFIG
UPLOADS = [
    # -- the safetensors container --
    pytest.param(
        Case(lambda ctx: ctx.upload(weights=struct.pack("<Q", 2**63) + b"{}"), 400, "invalid_adapter", W),
        id="upload-header-length-bomb",
    ),
    pytest.param(
        Case(lambda ctx: ctx.upload(weights=struct.pack("<Q", 64) + b"{}"), 400, "invalid_adapter", W),
        id="upload-header-length-past-eof",
    ),
    pytest.param(
        Case(lambda ctx: ctx.upload(weights=pack(b"{not json", b"")), 400, "invalid_adapter", W),
        id="upload-header-not-json",
    ),
    pytest.param(
        Case(lambda ctx: header(ctx, lambda h, n: _shift(h, n, -4)), 400, "invalid_adapter"),
        id="upload-overlapping-offsets",
    ),
    pytest.param(
        Case(
            lambda ctx: header(
                ctx, lambda h, n: h[n[-1]].update(data_offsets=[o + 2**40 for o in h[n[-1]]["data_offsets"]])
            ),
            400,
            "invalid_adapter",
        ),
        id="upload-offsets-out-of-range",
    ),
    pytest.param(
        Case(lambda ctx: ctx.upload(weights=ctx.weights + b"\0" * 64), 400, "invalid_adapter", W),
        id="upload-trailing-bytes",
    ),
    pytest.param(
        Case(lambda ctx: ctx.upload(weights=ctx.weights[:-100]), 400, "invalid_adapter"),
        id="upload-truncated-weights",
    ),
    pytest.param(Case(_duplicate_names, 400, "invalid_adapter", W), id="upload-duplicate-tensor-names"),
    pytest.param(
        Case(lambda ctx: header(ctx, lambda h, n: h[n[0]].update(dtype="F8_E4M3")), 400, "invalid_adapter"),
        id="upload-fp8-dtype",
    ),
    pytest.param(
        Case(
            lambda ctx: header(ctx, lambda h, n: h[n[0]].update(shape=[h[n[0]]["shape"][0] * 2, 1])),
            400,
            "invalid_adapter",
        ),
        id="upload-shape-disagrees-with-offsets",
    ),
    pytest.param(
        Case(
            lambda ctx: header(ctx, lambda h, n: h[n[0]].update(shape=[2**32, 2**32, 2**32])),
            400,
            "invalid_adapter",
        ),
        id="upload-shape-product-overflow",
    ),
    pytest.param(Case(_many_entries, 400, "invalid_adapter"), id="upload-20k-header-entries"),
    # -- the tensors --
    pytest.param(
        Case(lambda ctx: tensors(ctx, _poke(float("nan"))), 400, "invalid_adapter"), id="upload-nan-weight"
    ),
    pytest.param(
        Case(lambda ctx: tensors(ctx, _poke(float("inf"))), 400, "invalid_adapter"), id="upload-inf-weight"
    ),
    pytest.param(
        Case(
            lambda ctx: tensors(
                ctx, lambda t: _set(t, first("lora_A")(t), t[first("lora_A")(t)].double().fill_(1e300))
            ),
            400,
            "invalid_adapter",
        ),
        id="upload-f64-beyond-f32",
    ),
    pytest.param(
        Case(
            lambda ctx: tensors(
                ctx, lambda t: _set(t, first("lora_A")(t), t[first("lora_A")(t)].T.contiguous())
            ),
            400,
            "invalid_adapter",
        ),
        id="upload-transposed-factor",
    ),
    pytest.param(
        Case(
            lambda ctx: tensors(
                ctx,
                lambda t: _set(
                    t, first("lora_A")(t).replace(".layers.0.", ".layers.99."), torch.zeros(4, 576)
                ),
            ),
            400,
            "invalid_adapter",
        ),
        id="upload-module-not-in-base",
    ),
    # -- adapter_config.json --
    pytest.param(
        Case(lambda ctx: config(ctx, r=64), 400, "invalid_adapter", "r"), id="upload-rank-above-limit"
    ),
    pytest.param(
        Case(lambda ctx: config(ctx, notes="x" * 70_000), 400, "invalid_adapter", C), id="upload-config-huge"
    ),
    pytest.param(
        Case(lambda ctx: ctx.upload(config=b"[" * 20_000 + b"]" * 20_000), 400, "invalid_adapter", C),
        id="upload-config-deeply-nested",
    ),
    pytest.param(
        Case(lambda ctx: config(ctx, notes=json.loads("[" * 40 + "]" * 40)), 400, "invalid_adapter", C),
        id="upload-config-nested-in-an-ignored-key",
    ),
    pytest.param(
        Case(lambda ctx: config(ctx, target_modules="(a+)+$"), 400, "invalid_adapter", "target_modules"),
        id="upload-config-redos-regex",
    ),
    pytest.param(
        Case(
            lambda ctx: config(ctx, peft_type="LOHA", auto_mapping={"base_model_class": "os.system"}),
            400,
            "invalid_adapter",
            "peft_type",
        ),
        id="upload-config-not-lora",
    ),
    # -- names and file names (a name never becomes a path; see the store's layout) --
    pytest.param(_name("team/.."), id="upload-name-dot-dot"),
    pytest.param(_name("evil\u202etxt.exe"), id="upload-name-rtl-override"),
    pytest.param(
        Case(
            lambda ctx: ctx.upload(
                files={"a": (f"../../{CONFIG}", ctx.config), "b": ("../../adapter_model.bin", b"\x80\x04")}
            ),
            400,
            "invalid_adapter",
            "adapter_model.bin",
        ),
        id="upload-filename-pickle",
    ),
    pytest.param(
        Case(
            lambda ctx: ctx.upload(
                files={C: (C, ctx.config), "b": ("adapter_model.safet\u0435nsors", ctx.weights)}
            ),
            400,
            "invalid_adapter",
            "b",
        ),
        id="upload-filename-homoglyph",
    ),
    pytest.param(Case(_filename_traversal, 200, check=_no_stray_files), id="upload-filename-traversal"),
    # -- the multipart body --
    pytest.param(
        Case(
            lambda ctx: ctx.upload(
                files={C: (C, ctx.config), W: (W, ctx.weights), "x": ("notes.txt", b"hi")}
            ),
            400,
            "invalid_request",
        ),
        id="upload-multipart-extra-part",
    ),
    pytest.param(
        Case(lambda ctx: ctx.upload(files={C: (C, ctx.config)}), 400, "invalid_adapter", W),
        id="upload-multipart-missing-part",
    ),
    pytest.param(
        Case(lambda ctx: ctx.upload(None), 400, "invalid_adapter", "name"), id="upload-multipart-missing-name"
    ),
    pytest.param(
        Case(lambda ctx: _multipart(ctx, "multipart/form-data", b"--x\r\n"), 400, "invalid_request"),
        id="upload-multipart-no-boundary",
    ),
    pytest.param(
        Case(_chunked_oversized, 413, "payload_too_large", None), id="upload-chunked-over-the-limit"
    ),
]
