"""What every route needs: the server state, API errors in OpenAI's shape, running blocking engine calls."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import Request

if TYPE_CHECKING:
    from gyre.engine.engine import Engine
    from gyre.engine.server.generation import Generation
    from gyre.engine.server.sessions import SessionView

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    499: "client_closed_request",
    501: "not_implemented",
    503: "service_unavailable",
    504: "timeout",
}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers


def error_body(
    status: int, message: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    kind = _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "internal_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass
class ServerState:
    engine: Engine | None
    model_name: str
    admin_key: str | None
    allowed_weight_roots: tuple[Path, ...]  # resolved (symlinks followed)
    health_timeout_s: float = 30.0
    control_timeout_s: float = 600.0
    load_error: str | None = None
    started: float = field(default_factory=time.time)
    live: dict[str, Generation] = field(default_factory=dict)  # reply id -> its requests in flight
    sessions: dict[str, SessionView] = field(default_factory=dict)
    http_responses: dict[str, int] = field(default_factory=dict)  # "2xx" -> count
    server_errors: list[tuple[str, str, int]] = field(
        default_factory=list
    )  # the last 5xx: (method, path, status)
    health_probe: asyncio.Task | None = None
    last_scrape: tuple[float, int] | None = None  # (time, generated tokens) at the previous /metrics

    def require_engine(self) -> Engine:
        if self.engine is None:
            why = (
                f"the model failed to load: {self.load_error}" if self.load_error else "the model is loading"
            )
            raise ApiError(503, why)
        return self.engine

    def check_model(self, model: str) -> None:
        if model not in (self.model_name, self.engine.config.model_path if self.engine else None):
            raise ApiError(
                404,
                f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                code="model_not_found",
                param="model",
            )


def get_state(request: Request) -> ServerState:
    return request.app.state.gyre


async def blocking(st: ServerState, fn: Callable[[], Any], timeout: float | None = None) -> Any:
    """Run a blocking engine call (control, weight update) in a thread, with a timeout (504)."""
    timeout = st.control_timeout_s if timeout is None else timeout
    try:
        return await asyncio.wait_for(asyncio.to_thread(fn), timeout)
    except asyncio.TimeoutError:
        raise ApiError(504, f"the engine did not answer within {timeout:.0f} s") from None


def resolve_roots(roots: Any) -> tuple[Path, ...]:
    return tuple(Path(os.path.realpath(r)) for r in roots)
