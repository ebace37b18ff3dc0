"""Linear layers whose parameters load in place through per-parameter weight loaders.

Every parameter carries `weight_loader(param, loaded, shard_id=None)`: the one path used both to load a
checkpoint and to hot-swap weights (`param.data.copy_`, so CUDA graphs captured on it stay valid).
Column-parallel layers split the output dim over tensor-parallel ranks, row-parallel the input dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gyre.engine.parallel import get_parallel_state, tp_all_reduce
from gyre.kernels import batch_invariant as bi


def default_weight_loader(param: torch.Tensor, loaded: torch.Tensor, shard_id: object = None) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)} vs loaded {tuple(loaded.shape)}")
    param.data.copy_(loaded)


def expected_shape(param: nn.Parameter, shard_id: object = None) -> tuple[int, ...]:
    """The full (unsharded, per-shard) HF tensor shape this parameter's loader accepts."""
    fn = getattr(param, "expected_shape", None)
    return fn(shard_id) if fn is not None else tuple(param.shape)


class Linear(nn.Module):
    """y = x W^T (+ b). tp_mode: None (replicated), "column" (split out dim) or "row" (split in dim)."""

    batch_invariant = False  # set by gyre.engine.deterministic.make_batch_invariant

    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp_mode: str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        st = get_parallel_state()
        self.tp_mode = tp_mode
        self.tp_rank, self.tp_size = (st.tp_rank, st.tp_size) if tp_mode else (0, 1)
        self.full_in, self.full_out = in_features, out_features
        out_local = out_features // self.tp_size if tp_mode == "column" else out_features
        in_local = in_features // self.tp_size if tp_mode == "row" else in_features
        if (tp_mode == "column" and out_features % self.tp_size) or (tp_mode == "row" and in_features % self.tp_size):
            raise ValueError(f"tp_size {self.tp_size} does not divide linear layer {in_features}x{out_features}")
        self.weight = nn.Parameter(torch.empty(out_local, in_local, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self._load_weight
        self.weight.expected_shape = lambda shard_id=None: (out_features, in_features)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_local, dtype=dtype), requires_grad=False)
            self.bias.weight_loader = self._load_bias
            self.bias.expected_shape = lambda shard_id=None: (out_features,)
        else:
            self.bias = None

    def _shard(self, loaded: torch.Tensor, dim: int) -> torch.Tensor:
        if self.tp_size == 1:
            return loaded
        size = loaded.shape[dim] // self.tp_size
        return loaded.narrow(dim, self.tp_rank * size, size)

    def _load_weight(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: object = None) -> None:
        if self.tp_mode == "column":
            loaded = self._shard(loaded, 0)
        elif self.tp_mode == "row":
            loaded = self._shard(loaded, 1)
        default_weight_loader(param, loaded)

    def _load_bias(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: object = None) -> None:
        if self.tp_mode == "column":
            loaded = self._shard(loaded, 0)
        default_weight_loader(param, loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch_invariant:
            return bi.linear(x, self.weight, self.bias)
        if self.tp_mode == "row" and self.tp_size > 1:
            y = F.linear(x, self.weight)
            tp_all_reduce(y)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)


class MergedColumnLinear(Linear):
    """Several HF projections fused along the output dim (qkv, gate_up), each column-sharded.

    shard_sizes: full output sizes of each named shard, in order, e.g. {"q": 2048, "k": 512, "v": 512}.
    """

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool = False,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, sum(shard_sizes.values()), bias=bias, tp_mode="column", dtype=dtype)
        self.shard_sizes = dict(shard_sizes)
        for s in shard_sizes.values():
            if s % self.tp_size:
                raise ValueError(f"tp_size {self.tp_size} does not divide fused projection of size {s}")
        self.weight.expected_shape = lambda shard_id=None: (self.shard_sizes[shard_id], in_features)
        if bias:
            self.bias.expected_shape = lambda shard_id=None: (self.shard_sizes[shard_id],)

    def _local_range(self, shard_id: str) -> tuple[int, int]:
        offset = 0
        for name, size in self.shard_sizes.items():
            local = size // self.tp_size
            if name == shard_id:
                return offset, local
            offset += local
        raise KeyError(f"unknown shard {shard_id!r}; expected one of {list(self.shard_sizes)}")

    def _load_weight(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: object = None) -> None:
        start, size = self._local_range(shard_id)
        default_weight_loader(param.data.narrow(0, start, size), self._shard(loaded, 0))

    _load_bias = _load_weight
