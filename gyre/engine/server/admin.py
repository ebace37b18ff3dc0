"""Admin endpoints: weight updates and engine control, for the trainer's side of an RL loop.

All require `Authorization: Bearer <admin key>` (checked again in the ASGI middleware, before the body
is read); with no key configured they do not exist (404). Disk updates read only from directories under
the allowed weight roots, after resolving symlinks and `..`, for the directory and for every file the
engine would open (403 otherwise).
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request

from gyre.engine.server.common import ApiError, ServerState, blocking, get_state
from gyre.engine.server.protocol import (
    AbortRequest,
    DiskUpdateRequest,
    GroupInitRequest,
    GroupUpdateRequest,
    MemoryRequest,
    PauseRequest,
)
from gyre.engine.weights import safetensors_files


def check_admin(st: ServerState, authorization: str | None) -> None:
    if st.admin_key is None:
        raise ApiError(404, "admin endpoints are off: start the server with an admin key")
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), st.admin_key.encode()):
        raise ApiError(
            401,
            "admin endpoints need 'Authorization: Bearer <admin key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )


def _require_admin(request: Request) -> None:
    check_admin(get_state(request), request.headers.get("authorization"))


router = APIRouter(prefix="/admin", dependencies=[Depends(_require_admin)])


def weight_dir(st: ServerState, path: str) -> Path:
    """The resolved directory to load, if it and every file in it the engine reads are under a root."""
    roots = st.allowed_weight_roots
    if not roots:
        raise ApiError(
            403, "disk weight updates are off: no allowed weight roots are configured", param="path"
        )

    def allowed(p: Path) -> bool:
        return any(p == r or p.is_relative_to(r) for r in roots)

    real = Path(os.path.realpath(path))
    if not allowed(real):
        raise ApiError(403, "the path resolves outside the allowed weight roots", param="path")
    if not real.is_dir():
        raise ApiError(400, f"{path} is not a directory", param="path")
    try:
        files = safetensors_files(real)
    except (FileNotFoundError, ValueError) as e:
        raise ApiError(400, str(e), param="path") from None
    index = real / "model.safetensors.index.json"
    for f in [*files, index] if index.exists() else files:
        if not allowed(Path(os.path.realpath(f))):
            raise ApiError(
                403, f"{f.name} resolves outside the allowed weight roots (a symlink?)", param="path"
            )
    return real


@router.post("/update_weights_from_disk")
async def update_weights_from_disk(body: DiskUpdateRequest, request: Request) -> dict[str, Any]:
    st = get_state(request)
    engine = st.require_engine()
    path = weight_dir(st, body.path)
    version = await blocking(st, lambda: engine.update_weights_from_disk(path, body.version))
    return {"weight_version": version}


@router.post("/load_draft")
async def load_draft(body: DiskUpdateRequest, request: Request) -> dict[str, Any]:
    """New speculative-decoding draft weights (EAGLE head or draft LM directory) under the allowed roots."""
    st = get_state(request)
    engine = st.require_engine()
    if getattr(engine, "spec", None) is None:
        raise ApiError(400, "this engine runs without speculative decoding (spec_method)", param="path")
    path = weight_dir(st, body.path)
    try:
        await blocking(st, lambda: engine.load_draft(path))
    except (ValueError, FileNotFoundError) as e:
        raise ApiError(400, str(e), param="path") from None
    return {"spec": {k: v for k, v in engine.stats().items() if k.startswith("spec_")}}


@router.post("/init_weight_group")
async def init_weight_group(body: GroupInitRequest, request: Request) -> dict[str, Any]:
    st = get_state(request)
    engine = st.require_engine()
    try:
        await blocking(
            st,
            lambda: engine.init_weight_group(
                body.master_addr,
                body.master_port,
                body.rank_offset,
                body.world_size,
                body.backend,
                body.group_name,
            ),
        )
    except ImportError as e:
        raise ApiError(501, f"weight groups are not available in this build: {e}") from None
    return {"ok": True}


@router.post("/update_weights_from_group")
async def update_weights_from_group(body: GroupUpdateRequest, request: Request) -> dict[str, Any]:
    st = get_state(request)
    engine = st.require_engine()
    try:
        version = await blocking(
            st, lambda: engine.update_weights_from_group(body.names, body.dtypes, body.shapes, body.version)
        )
    except RuntimeError as e:  # no group initialised
        raise ApiError(409, str(e)) from None
    return {"weight_version": version}


@router.post("/pause")
async def pause(request: Request, body: PauseRequest | None = None) -> dict[str, Any]:
    st = get_state(request)
    engine = st.require_engine()
    await blocking(st, lambda: engine.pause((body or PauseRequest()).mode))
    return {"paused": True}


@router.post("/resume")
async def resume(request: Request) -> dict[str, Any]:
    st = get_state(request)
    engine = st.require_engine()
    await blocking(st, engine.resume)
    return {"paused": False}


@router.post("/flush_cache")
async def flush_cache(request: Request) -> dict[str, Any]:
    st = get_state(request)
    engine = st.require_engine()
    return {"pages_freed": await blocking(st, engine.flush_cache)}


@router.post("/release_memory")
async def release_memory(request: Request, body: MemoryRequest | None = None) -> dict[str, Any]:
    st = get_state(request)
    engine = st.require_engine()
    tags = (body or MemoryRequest()).tags
    await blocking(st, lambda: engine.release_memory(tags))
    return {"released": sorted(engine.weights.memory_released)}


@router.post("/resume_memory")
async def resume_memory(request: Request, body: MemoryRequest | None = None) -> dict[str, Any]:
    st = get_state(request)
    engine = st.require_engine()
    tags = (body or MemoryRequest()).tags
    await blocking(st, lambda: engine.resume_memory(tags))
    return {"released": sorted(engine.weights.memory_released)}


@router.post("/abort")
async def abort(request: Request, body: AbortRequest | None = None) -> dict[str, Any]:
    """Abort a request by its reply id (chatcmpl-..., cmpl-...) or engine id, or everything (no id)."""
    st = get_state(request)
    engine = st.require_engine()
    rid = (body or AbortRequest()).request_id
    if rid is None:
        engine.abort(None)
        return {"aborted": "all"}
    if rid in st.live:
        st.live[rid].abort()
    else:
        engine.abort(rid)
    return {"aborted": rid}
