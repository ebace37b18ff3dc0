"""Shared benchmark helpers: model shapes, device ceilings, result records."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"

SHAPES = {
    "llama3-8b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 128, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
        "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16",
    },
    "qwen3-30b-a3b": {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 151936,
        "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48,
        "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
        "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151645, "torch_dtype": "bfloat16",
    },
}


def shape_dir(name: str, root: str | Path = "/tmp/gyre-shapes") -> str:
    """An HF directory holding only config.json for a named shape (use with load_format='dummy')."""
    path = Path(root) / name
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(SHAPES[name], indent=1))
    return str(path)


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def commit() -> str:
    """GYRE_COMMIT when set (the device machine's copy of the tree may carry a stale .git), else git's HEAD."""
    if os.environ.get("GYRE_COMMIT"):
        return os.environ["GYRE_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("GYRE_COMMIT", "unknown")


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return 2 * src.numel() * src.element_size() / times[len(times) // 2]


def matmul_flops(n: int = 8192) -> float:
    """Measured bf16 matmul rate (FLOP/s) on random data."""
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    end.synchronize()
    return 10 * 2 * n**3 / (start.elapsed_time(end) / 1e3)


def record(name: str, result: dict) -> dict:
    """Adds device/commit/date, prints one JSON line, appends it to benchmarks/results/<name>-<device>.json."""
    result = {"benchmark": name, "device": device_name(), "commit": commit(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **result}
    line = json.dumps(result)
    print(line, flush=True)
    out_dir = Path(os.environ.get("GYRE_RESULTS", RESULTS))
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = result["device"].replace(" ", "_")
    with open(out_dir / f"{name}-{tag}.json", "a") as f:
        f.write(line + "\n")
    return result


class Timer:
    def __enter__(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start


class CallTimes:
    """Wall time per call of methods patched on objects (instances or classes), until restore()."""

    def __init__(self) -> None:
        self.total: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._saved: list = []

    def patch(self, obj, name: str) -> None:
        fn = getattr(obj, name)
        key = f"{getattr(obj, '__name__', type(obj).__name__)}.{name}"

        def wrapper(*a, **kw):
            start = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.total[key] = self.total.get(key, 0.0) + time.perf_counter() - start
                self.calls[key] = self.calls.get(key, 0) + 1

        self._saved.append((obj, name, fn))
        setattr(obj, name, wrapper)

    def restore(self) -> None:
        for obj, name, fn in reversed(self._saved):
            if isinstance(obj, type):
                setattr(obj, name, fn)
            else:
                delattr(obj, name)  # the instance attribute shadowed the class's method
        self._saved.clear()

    def summary(self, unit: float = 1e6) -> dict:
        """{name: {"calls", "per_call"}}, per_call in seconds * unit (microseconds by default)."""
        return {k: {"calls": self.calls[k], "per_call": unit * self.total[k] / self.calls[k]} for k in self.total}
