"""Helpers of the weight-sync tests. Functions taking `engine` run inside an EngineProcess child."""

from __future__ import annotations

import functools
import gc
import hashlib
import os
import signal
import socket
import time
import warnings

import torch

PROMPTS = [[1, 872, 198, 20, 21, 220, 10, 221, 2], [5, 17, 300, 41, 9, 77, 1200, 3, 64, 88, 12]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trainer_tensors(model_dir: str, seed: int | None) -> list[tuple[str, torch.Tensor]]:
    """The checkpoint's HF-named tensors, perturbed by 0.05 * N(0, 1) noise drawn from seed (None: as is)."""
    from safetensors.torch import load_file

    state = load_file(os.path.join(model_dir, "model.safetensors"))
    named = sorted(state.items())
    if seed is None:
        return named
    g = torch.Generator().manual_seed(seed)
    return [(n, t + 0.05 * torch.randn(t.shape, generator=g)) for n, t in named]


@functools.lru_cache(maxsize=2)
def _hf(model_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def hf_model(model_dir: str, named: list[tuple[str, torch.Tensor]]):
    model = _hf(model_dir)
    model.load_state_dict(dict(named), strict=True)
    return model


@torch.no_grad()
def hf_greedy(
    model, prompt: list[int], n: int, past: list[int] | None = None, prefix_model=None
) -> list[int]:
    """Greedy tokens of `model` after prompt (+ past tokens). With prefix_model, the KV of prompt + past[:-1]
    comes from prefix_model, as when weights change under a running request (in_place)."""
    ids = prompt + (past or [])
    first = prefix_model if prefix_model is not None else model
    out = first(torch.tensor([ids[:-1]]), use_cache=True)
    cache, last, toks = out.past_key_values, ids[-1], []
    for _ in range(n):
        out = model(torch.tensor([[last]]), past_key_values=cache, use_cache=True)
        cache, last = out.past_key_values, int(out.logits[0, -1].argmax())
        toks.append(last)
    return toks


def checksum(engine) -> str:
    h = hashlib.sha256()
    for name, p in engine.runner.model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def live_tensors(engine=None) -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance on deprecated torch objects warns
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def partial_trainer(
    model_dir: str,
    port: int,
    world_size: int,
    how: str,
    ready,
    bucket_bytes: int,
    backend: str = "gloo",
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> None:
    """A trainer that sends the first two buckets of an update, then dies ("kill") or goes silent ("hang")."""
    import datetime

    import torch.distributed as dist

    from gyre.weight_sync.group import WeightGroup
    from gyre.weight_sync.stream import GroupStream

    store = dist.TCPStore(
        "127.0.0.1",
        port,
        world_size,
        is_master=True,
        timeout=datetime.timedelta(seconds=60),
        wait_for_workers=False,
    )
    ready.set()
    group = WeightGroup(
        "127.0.0.1", port, 0, world_size, backend, "gyre-weights", torch.device(device), 60, store=store
    )
    stream = GroupStream(group, version=10**6, bucket_bytes=bucket_bytes)
    for name, t in trainer_tensors(model_dir, seed=123):
        stream.add(name, t.to(device, dtype))
        if stream.num_buckets == 2:
            break
    group.wait([w for w, *_ in stream._in_flight], "two buckets")
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(120)


def drop_weight_group(engine) -> None:
    """As if the engine lost its group: its next update_weights_from_group fails before receiving."""
    engine.weights.close()


def cuda_allocated(engine) -> int:
    torch.cuda.synchronize(engine.runner.device)
    return torch.cuda.memory_allocated(engine.runner.device)
