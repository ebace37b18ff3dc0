"""gyre's HTTP server (FastAPI + uvicorn, imported only here: `gyre.engine` never imports this package).

    from gyre.engine.server import build_app, serve
    app = build_app(engine, admin_key=None, allowed_weight_roots=(), model_name=None)
    serve(["--model", path, "--port", "8000"])          # what `gyre serve` runs

Routes: /v1/chat/completions, /v1/completions, /v1/models (OpenAI-compatible); /generate (native,
token ids); /v1/sessions/... (multi-turn, exact trajectories); /admin/... (weight updates, control;
Bearer admin key); /health; /metrics (Prometheus). Binds 127.0.0.1 unless told otherwise; nothing from
the network is unpickled; bodies are validated (400 in OpenAI's error shape, never a 5xx for bad input).
"""

from gyre.engine.server.app import build_app, serve

__all__ = ["build_app", "serve"]
