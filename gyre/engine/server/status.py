"""GET /health (a real one-token generation), /metrics (Prometheus text), /v1/models."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from gyre.engine.engine import Engine
from gyre.engine.request import SamplingParams
from gyre.engine.server.common import ApiError, ServerState, get_state

router = APIRouter()
_COUNTERS = {
    "num_steps",
    "num_generated_tokens",
    "num_prefill_tokens",
    "num_prompt_tokens",
    "num_cached_prompt_tokens",
    "prefill_tokens_saved",
    "num_retractions",
}


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """200 after a real one-token generation; 503 while loading, paused, released, stopped or wedged."""
    st = get_state(request)
    engine = st.engine
    if engine is None:
        return JSONResponse(
            {"status": "failed" if st.load_error else "loading", "message": st.load_error}, status_code=503
        )
    reason = None
    if engine._stopped or not engine._thread.is_alive():
        reason = "stopped"
    elif engine.is_paused:
        reason = "paused"
    elif engine.weights.memory_released:
        reason = "memory_released"
    if reason is not None:
        return JSONResponse({"status": reason}, status_code=503)
    if st.health_probe is None or st.health_probe.done():
        st.health_probe = asyncio.ensure_future(_probe(engine))
    try:
        latency = await asyncio.wait_for(asyncio.shield(st.health_probe), st.health_timeout_s)
    except asyncio.TimeoutError:
        return JSONResponse(
            {"status": "wedged", "message": f"no token within {st.health_timeout_s:.0f} s"}, status_code=503
        )
    except Exception as e:  # noqa: BLE001
        return JSONResponse({"status": "error", "message": f"{type(e).__name__}: {e}"}, status_code=503)
    return JSONResponse({"status": "ok", "weight_version": engine.weight_version, "latency_s": latency})


async def _probe(engine: Engine) -> float:
    start = time.monotonic()
    c = await engine.agenerate([0], SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True))
    if c.finish_reason == "abort" or len(c.output_ids) != 1:
        raise RuntimeError(f"the probe was aborted: {c.abort_reason}")
    return time.monotonic() - start


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> PlainTextResponse:
    """Prometheus text format: engine.stats(), generation tokens/s since the last scrape, HTTP responses."""
    st = get_state(request)
    engine = st.engine
    lines: list[str] = []

    def emit(name: str, kind: str, value: float, labels: str = "") -> None:
        if not any(line.startswith(f"# TYPE gyre_{name} ") for line in lines):
            lines.append(f"# TYPE gyre_{name} {kind}")
        text = str(int(value)) if isinstance(value, (bool, int)) else repr(float(value))
        lines.append(f"gyre_{name}{labels} {text}")

    emit("up", "gauge", engine is not None)
    stats = None
    if engine is not None:
        try:
            stats = await asyncio.wait_for(asyncio.to_thread(engine.call, engine.stats, 5.0), 6.0)
        except Exception:  # noqa: BLE001 - a wedged engine still gets scraped
            stats = None
        emit("engine_responsive", "gauge", stats is not None)
    if stats is not None:
        for key, value in stats.items():
            if isinstance(value, (bool, int, float)):
                if key in _COUNTERS:
                    emit(f"{key}_total", "counter", value)
                else:
                    emit(key, "gauge", value)
        now, generated = time.monotonic(), stats["num_generated_tokens"]
        if st.last_scrape is not None and now > st.last_scrape[0]:
            rate = (generated - st.last_scrape[1]) / (now - st.last_scrape[0])
        else:
            rate = generated / max(stats["uptime_s"], 1e-9)
        st.last_scrape = (now, generated)
        emit("generation_tokens_per_second", "gauge", rate)
        emit("memory_released", "gauge", bool(engine.weights.memory_released))
    emit("http_requests_in_flight", "gauge", len(st.live))
    for cls in sorted(st.http_responses):
        emit("http_responses_total", "counter", st.http_responses[cls], f'{{code="{cls}"}}')
    return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4; charset=utf-8")


def _model_card(st: ServerState) -> dict[str, Any]:
    engine = st.engine
    return {
        "id": st.model_name,
        "object": "model",
        "created": int(st.started),
        "owned_by": "gyre",
        "max_model_len": engine.max_model_len if engine is not None else None,
    }


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [_model_card(get_state(request))]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    st = get_state(request)
    if model_id != st.model_name:
        raise ApiError(404, f"the model {model_id!r} does not exist", code="model_not_found")
    return _model_card(st)
