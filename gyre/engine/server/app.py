"""The FastAPI app: middleware (host check, body limit, admin guard) and errors in OpenAI's shape; the
routes live in openai_api, sessions, admin and status. `serve()` is `gyre serve`."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import math
import os
import threading
import traceback
from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse as _JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gyre.engine.config import EngineConfig
from gyre.engine.engine import Engine
from gyre.engine.server import admin, openai_api, sessions, status
from gyre.engine.server.common import ApiError, ServerState, error_body, resolve_roots

log = logging.getLogger("gyre.server")

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class JSONResponse(_JSONResponse):
    """UTF-8 JSON that never fails to encode: no NaN/inf (they become null), no lone surrogates."""

    def render(self, content: Any) -> bytes:
        try:
            text = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        except ValueError:
            text = json.dumps(_finite(content), ensure_ascii=False, separators=(",", ":"))
        return text.encode("utf-8", "replace")


def _finite(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _error(
    status: int,
    message: str,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(status, message, code, param), status_code=status, headers=headers)


class _BodyTooLarge(Exception):
    pass


class GuardMiddleware:
    """Pure ASGI, before any route: Host header check (DNS rebinding onto a loopback server), body size
    limit (413), the admin key for /admin/* (404 when off, 401), and counts of response classes."""

    def __init__(
        self, app: Any, st: ServerState, allowed_hosts: Sequence[str] | None, max_body_bytes: int
    ) -> None:
        self.app = app
        self.st = st
        self.hosts = (
            None if allowed_hosts is None or "*" in allowed_hosts else {h.lower() for h in allowed_hosts}
        )
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            await refusal(scope, receive, send)
            self._count(refusal.status_code)
            return
        received = 0

        async def limited_receive() -> Any:
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > self.max_body_bytes:
                    raise _BodyTooLarge(f"the request body is larger than {self.max_body_bytes} bytes")
            return msg

        async def counting_send(msg: Any) -> None:
            if msg["type"] == "http.response.start":
                self._count(msg["status"])
                if msg["status"] >= 500:
                    self.st.server_errors.append((scope["method"], scope["path"], msg["status"]))
                    del self.st.server_errors[:-100]
            await send(msg)

        await self.app(scope, limited_receive, counting_send)

    def _refusal(self, scope: Any, headers: dict[str, str]) -> JSONResponse | None:
        host = headers.get("host")
        if self.hosts is not None and host is not None and _hostname(host) not in self.hosts:
            return _error(400, f"Host {host!r} is not served here (allowed: {sorted(self.hosts)})")
        length = headers.get("content-length", "0")
        if not length.isdigit():
            return _error(400, "invalid Content-Length")
        if int(length) > self.max_body_bytes:
            return _error(413, f"the request body is larger than {self.max_body_bytes} bytes")
        path = scope["path"]
        if path == "/admin" or path.startswith("/admin/"):
            try:
                admin.check_admin(self.st, headers.get("authorization"))
            except ApiError as e:
                return _error(e.status, e.message, headers=e.headers)
        return None

    def _count(self, status: int) -> None:
        key = f"{status // 100}xx"
        self.st.http_responses[key] = self.st.http_responses.get(key, 0) + 1


def _hostname(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    parts, param = [], None
    for e in errors[:4]:
        if e.get("type") == "json_invalid":
            return f"malformed JSON body: {e.get('ctx', {}).get('error', e.get('msg'))}", None
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        param = param or loc
        parts.append(f"{loc}: {e.get('msg')}")
    more = f" (and {len(errors) - 4} more)" if len(errors) > 4 else ""
    return "; ".join(parts) + more, param


def build_app(
    engine: Engine | Callable[[], Engine] | None,
    admin_key: str | None = None,
    allowed_weight_roots: Sequence[str | os.PathLike] = (),
    model_name: str | None = None,
    *,
    allowed_hosts: Sequence[str] | None = LOOPBACK_HOSTS,
    health_timeout_s: float = 30.0,
    control_timeout_s: float = 600.0,
    max_body_bytes: int = 64 << 20,
) -> FastAPI:
    """The HTTP app over `engine`, or over what `engine()` returns: a loader run in a thread at startup
    (/health is 503 until it is done), whose engine the app shuts down at exit.

    admin_key: None turns the /admin endpoints off. allowed_weight_roots: directories that
    /admin/update_weights_from_disk may read (none: disk updates are refused). allowed_hosts: Host
    header names accepted (None or "*": any); the default suits a server bound to loopback.
    """
    loader = None if engine is None or isinstance(engine, Engine) else engine
    ready = engine if isinstance(engine, Engine) else None
    if model_name is None:
        model_name = ready.config.model_path if ready is not None else "default"
    if admin_key is not None and len(admin_key) < 8:
        raise ValueError("the admin key must be at least 8 characters")
    st = ServerState(
        ready,
        model_name,
        admin_key,
        resolve_roots(allowed_weight_roots),
        health_timeout_s=health_timeout_s,
        control_timeout_s=control_timeout_s,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if loader is not None:

            def load() -> None:
                try:
                    st.engine = loader()
                except Exception as e:  # noqa: BLE001 - reported by /health and every route
                    st.load_error = f"{type(e).__name__}: {e}"
                    log.error("loading the model failed: %s", traceback.format_exc())

            threading.Thread(target=load, name="gyre-load", daemon=True).start()
        try:
            yield
        finally:
            if loader is not None and st.engine is not None:
                await asyncio.to_thread(st.engine.shutdown)

    app = FastAPI(title="gyre", version="0.1.0", lifespan=lifespan, default_response_class=JSONResponse)
    app.state.gyre = st
    app.add_middleware(GuardMiddleware, st=st, allowed_hosts=allowed_hosts, max_body_bytes=max_body_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return _error(e.status, e.message, e.code, e.param, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(e)
        return _error(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        cause = e.__cause__
        if isinstance(cause, _BodyTooLarge):
            return _error(413, str(cause))
        return _error(e.status_code, str(e.detail), headers=getattr(e, "headers", None))

    @app.exception_handler(ValueError)
    async def _value(request: Request, e: ValueError) -> JSONResponse:  # the engine's "this input is wrong"
        return _error(400, str(e))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> JSONResponse:
        log.error("internal error on %s: %s", request.url.path, traceback.format_exc())
        return _error(500, f"internal error: {type(e).__name__}: {e}")

    app.include_router(openai_api.router)
    app.include_router(sessions.router)
    app.include_router(admin.router)
    app.include_router(status.router)
    return app


# -- gyre serve -------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gyre serve", description="Serve a model over HTTP (OpenAI-compatible, native, sessions, admin)."
    )
    p.add_argument("--model", required=True, help="HF-format model directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="the model id clients use (default: --model)")
    p.add_argument(
        "--admin-key", default=None, help="enables /admin/*; prefer --admin-key-file or $GYRE_ADMIN_KEY"
    )
    p.add_argument("--admin-key-file", default=None, help="file holding the admin key")
    p.add_argument(
        "--allowed-weight-roots",
        nargs="*",
        default=[],
        metavar="DIR",
        help="directories /admin/update_weights_from_disk may read",
    )
    p.add_argument(
        "--allowed-hosts",
        nargs="*",
        default=None,
        help="Host header names accepted (default: loopback names when bound to loopback, else any)",
    )
    p.add_argument("--health-timeout", type=float, default=30.0, help="seconds /health waits for its token")
    p.add_argument("--log-level", default="info")
    engine = p.add_argument_group("engine", "EngineConfig fields")
    types = {"int": int, "float": float, "str": str}
    for f in dataclasses.fields(EngineConfig):
        if f.name == "model_path":
            continue
        flag = "--" + f.name.replace("_", "-")
        base = str(f.type).split("|")[0].strip()
        if base == "bool":
            engine.add_argument(
                flag,
                dest=f"engine.{f.name}",
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=f"default {f.default}",
            )
        elif base in types:
            engine.add_argument(
                flag,
                dest=f"engine.{f.name}",
                type=types[base],
                default=argparse.SUPPRESS,
                help=f"default {f.default}",
            )
    return p


def serve(argv: list[str] | None = None) -> None:
    """`gyre serve --model PATH [--host 127.0.0.1] [--port 8000] [--admin-key-file F] [--allowed-weight-roots
    DIR ...] [engine options]`: load the model (in the background; /health says when) and serve."""
    import uvicorn

    args = _parser().parse_args(argv)
    fields = {k.removeprefix("engine."): v for k, v in vars(args).items() if k.startswith("engine.")}
    EngineConfig.from_kwargs(model_path=args.model, **fields)  # bad options fail now, not in the loader
    key = args.admin_key
    if key is None and args.admin_key_file:
        key = Path(args.admin_key_file).read_text().strip()
    if key is None:
        key = os.environ.get("GYRE_ADMIN_KEY") or None
    loopback = args.host in LOOPBACK_HOSTS
    hosts = args.allowed_hosts if args.allowed_hosts is not None else (LOOPBACK_HOSTS if loopback else None)
    if not loopback:
        log.warning("binding %s: the OpenAI, native and session endpoints have no authentication", args.host)
    app = build_app(
        lambda: Engine(args.model, **fields),
        key,
        args.allowed_weight_roots,
        args.served_model_name or args.model,
        allowed_hosts=hosts,
        health_timeout_s=args.health_timeout,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
