"""Runtime of the model drafters: a small draft LM (spec_method "draft") and an EAGLE head ("eagle").
(Their KV pool and CUDA graphs: gyre.engine.spec.draft_kv.)

Each keeps its KV in a DraftKV: a pool with the target's pages (gyre.engine.spec.base) and the draft's
layers, addressed through the request's page_table, with its own attention backend. Two kinds of forward,
each batching every request of the call together:
- catch-up (observe): over the positions the target made final in its step, writing the draft's KV there.
  The draft LM reads the tokens x_p; the EAGLE head reads (embed(x_{p+1}), h_p), h the target's hidden.
- draft steps (propose): one decode row per request, greedy, fed back up to k times; on CUDA each step is
  the replay of a CUDA graph of its batch bucket (StepGraphs), the step's index tensors built once.
Per-request state (what the last catch-up or proposal left) is keyed by request id and names the request
object and the position it belongs to: a request retracted, re-prefilled or aborted in between finds no
matching state and gets no draft (EAGLE) or a full catch-up (draft LM), never an error.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoConfig

from gyre.engine.config import EngineConfig
from gyre.engine.kv_pool import KVPool
from gyre.engine.models import model_class
from gyre.engine.request import Request
from gyre.engine.spec.base import Drafter, TargetOutput
from gyre.engine.spec.draft_kv import DraftKV, StepGraphs
from gyre.engine.spec.eagle import ARCH, eagle_config, load_eagle, load_into
from gyre.engine.weights import iterate_safetensors, load_checkpoint, safetensors_files


def make_drafter(config: EngineConfig, runner) -> Drafter | None:
    """The model drafter of config.spec_method ("draft" | "eagle"), None for any other method."""
    if config.spec_method == "eagle":
        return EagleDrafter(runner, config)
    if config.spec_method == "draft":
        return DraftModelDrafter(runner, config)
    return None


def draft_kv_bytes_per_page(config: EngineConfig, target_hf_config: Any, dtype: torch.dtype) -> int:
    """Bytes of draft KV per page of the target's pool (0 without a model drafter)."""
    if config.spec_method == "eagle":
        path = config.spec_draft_path
        has_cfg = path is not None and os.path.isfile(os.path.join(path, "config.json"))
        cfg, layers = (_hf_config(path, "EAGLE head") if has_cfg else eagle_config(target_hf_config)), 1
    elif config.spec_method == "draft":
        cfg = _hf_config(_draft_path(config, "an HF causal LM directory"), "draft model")
        layers = cfg.num_hidden_layers
    else:
        return 0
    return KVPool.bytes_per_page(config.page_size, layers, cfg.num_key_value_heads, _head_dim(cfg), dtype)


class _ModelDrafter(Drafter):
    """What both model drafters share: the KV, the graphs, the per-request state, the counters."""

    def __init__(self, runner, config: EngineConfig, kv: DraftKV, max_positions: int,
                 hidden: tuple[int, torch.dtype] | None) -> None:
        self.runner, self.config, self.kv = runner, config, kv
        self.max_positions = max_positions  # of the draft's rotary table
        self._hidden = hidden
        self.states: dict[str, Any] = {}  # request_id -> the drafter's state (names its Request)
        self.num_forwards = 0
        self.num_tokens = 0
        self.graphs = self._make_graphs()

    def _make_graphs(self) -> StepGraphs | None:
        cfg = self.config
        if self.kv.device.type != "cuda" or not cfg.cuda_graph or self.kv.backend_name == "torch":
            return None  # the torch backend stages on the host: not capturable
        max_seq = min(cfg.cuda_graph_max_seq_len, self.runner.max_model_len) + cfg.spec_num_tokens
        return StepGraphs(self._step, self.kv, min(cfg.cuda_graph_max_bs, cfg.max_running_requests), max_seq,
                          self._hidden)

    def _step(self, tokens, hidden, positions, ctx):
        raise NotImplementedError

    def _purge(self) -> None:
        done = [rid for rid, st in self.states.items() if st.req.is_finished]
        for rid in done:
            del self.states[rid]

    def _room(self, req: Request, length: int, slack: int) -> int:
        """Draft steps that fit a request's reserved pages and the rotary table, when its last step writes
        position length + steps - slack."""
        return min(len(req.page_table) * self.kv.page_size, self.max_positions) - length + slack

    def stats(self) -> dict:
        return {"draft_forwards": self.num_forwards, "draft_tokens": self.num_tokens}

    def on_memory_released(self) -> None:
        """Drop the draft KV (and the graphs that point at it); page bookkeeping is the target's."""
        self.graphs = None
        self.kv.pool.release()
        self.states.clear()
        if self.kv.device.type == "cuda":
            torch.cuda.empty_cache()

    def on_memory_resumed(self) -> None:
        self.kv.pool.restore()
        if self.graphs is None:
            self.graphs = self._make_graphs()


@dataclass
class _EagleState:
    """Where a request's drafting state is: its row `slot` of EagleDrafter.features (the head's guess of
    h_{pos+1}) and .tokens (argmax lm_head of that feature: the draft of x_{pos+2} = x_{len(all_ids)})."""

    req: Request
    pos: int  # its catch-up row; current while pos == len(all_ids) - 2
    slot: int


class EagleDrafter(_ModelDrafter):
    """An EAGLE head (gyre.engine.spec.eagle) over the target's hidden states, embedding and lm_head."""

    name = "eagle"
    needs_hidden = True

    def __init__(self, runner, config: EngineConfig) -> None:
        _check_single_rank(runner, config)
        path = _draft_path(config, "an EAGLE head directory")
        try:
            self.head = load_eagle(path, runner.dtype, runner.device)
        except (FileNotFoundError, ValueError):
            raise
        except Exception as e:  # unreadable safetensors, a config transformers cannot parse
            raise ValueError(f"cannot load the EAGLE head at {path!r}: {e}") from e
        cfg, target = self.head.config, runner.hf_config
        for field in ("hidden_size", "vocab_size"):
            if getattr(cfg, field) != getattr(target, field):
                raise ValueError(f"EAGLE head {path!r}: {field} {getattr(cfg, field)} does not match the "
                                 f"target's {getattr(target, field)}")
        self.embed = runner.model.model.embed_tokens
        kv = DraftKV(runner, 1, cfg.num_key_value_heads, _head_dim(cfg))
        hidden = (cfg.hidden_size, runner.dtype)  # the feature fed back by each draft step
        super().__init__(runner, config, kv, int(cfg.max_position_embeddings), hidden)
        # per-request state on the device, one row per slot; the last row is scratch (padding rows write it)
        num_slots = config.max_running_requests + 2
        self.features = torch.zeros(num_slots, cfg.hidden_size, dtype=runner.dtype, device=runner.device)
        self.tokens = torch.zeros(num_slots, dtype=torch.int64, device=runner.device)
        self.scratch_slot = num_slots - 1
        self._free_all_slots()
        self.fused = None  # gyre.engine.spec.fused.FusedEagle: drafting, verify and catch-up in one launch
        if config.spec_fused and runner.config.attention_backend in ("auto", "torch", "triton") \
                and not config.deterministic:
            from gyre.engine.spec.fused import FusedEagle

            self.fused = FusedEagle(self, runner, config)

    def _free_all_slots(self) -> None:
        self.free_slots = list(range(self.scratch_slot - 1, -1, -1))

    def _purge(self) -> None:
        for rid in [rid for rid, st in self.states.items() if st.req.is_finished]:
            self.free_slots.append(self.states.pop(rid).slot)

    def _set_state(self, req: Request, pos: int) -> int | None:
        """The slot that will hold req's state at catch-up row pos (its old one, or a free one)."""
        st = self.states.get(req.request_id)
        if st is None:
            if not self.free_slots:
                self._purge()
                if not self.free_slots:
                    return None
            st = _EagleState(req, pos, self.free_slots.pop())
            self.states[req.request_id] = st
        st.req, st.pos = req, pos
        return st.slot

    def _store(self, lasts: list[tuple[Request, int, int]], features: torch.Tensor,
               tokens: torch.Tensor | None) -> None:
        """New states: lasts[i] = (request, row of features, catch-up position); tokens: argmax of the rows'
        logits (computed here when None)."""
        pick = self.kv.to_device([row for _, row, _ in lasts], torch.int64)
        keep = features.index_select(0, pick)
        picked = tokens.index_select(0, pick) if tokens is not None else \
            self.runner.model.compute_logits(keep).argmax(-1)
        slots = [self._set_state(req, pos) for req, _, pos in lasts]
        ok = [i for i, s in enumerate(slots) if s is not None]
        if len(ok) < len(slots):  # no free slot (more live states than requests can run): no draft for it
            keep, picked = keep[ok], picked[ok]
            slots = [slots[i] for i in ok]
        if slots:
            idx = self.kv.to_device(slots, torch.int64)
            self.features.index_copy_(0, idx, keep)
            self.tokens.index_copy_(0, idx, picked)

    def on_memory_released(self) -> None:
        if self.fused is not None:
            self.fused.drop_graphs()  # they point at the released KV
        super().on_memory_released()  # drops every state
        self._free_all_slots()

    def valid_slot(self, req: Request) -> int | None:
        """req's slot when its state is current (the catch-up of its last computed position), else None."""
        st = self.states.get(req.request_id)
        if st is None or st.req is not req or st.pos != _length(req) - 2:
            return None
        return st.slot

    def _step(self, tokens, hidden, positions, ctx):
        features = self.head(self.embed(tokens), hidden, positions, ctx)  # [B, H]
        return features, self.runner.model.compute_logits(features).argmax(-1)

    @torch.inference_mode()
    def observe(self, out: TargetOutput) -> None:
        self._purge()
        if out.hidden is None:
            return
        tables, starts, counts, rows, ids, lasts = [], [], [], [], [], []
        for req, s, n, r in zip(out.reqs, out.starts, out.num_valid, out.rows):
            length = _length(req)
            n = min(n, length - 1 - s)  # position p reads x_{p+1}: known up to p = length - 2
            if n <= 0 or self._room(req, s + n, 0) < 0:
                continue
            tables.append(req.page_table)
            starts.append(s)
            counts.append(n)
            rows.extend(range(r, r + n))
            ids.extend(req.token_range(s + 1, s + n + 1))
            if s + n == length - 1:
                lasts.append((req, len(rows) - 1, s + n - 1))
        if not counts:
            return
        hidden = out.hidden.index_select(0, self.kv.to_device(rows, torch.int64))  # [T, H]: h_p
        self.num_forwards += 1
        if self._catch_up_in_graph(tables, starts, counts, hidden, ids, lasts):
            return
        ctx, positions = self.kv.extend(tables, starts, counts)
        features = self.head(self.embed(self.kv.to_device(ids, torch.int64)), hidden, positions, ctx)
        if lasts:
            self._store(lasts, features, None)

    def _catch_up_in_graph(self, tables, starts, counts, hidden, ids, lasts) -> bool:
        """A short catch-up (after a verify: the last token and the accepted drafts) as independent decode
        rows, one per position, in the draft step's CUDA graph. False when it does not fit one."""
        graphs = self.graphs
        ps = self.kv.page_size
        num_rows = sum(counts)
        width = -(-max(s + n for s, n in zip(starts, counts)) // ps)
        if (graphs is None or max(counts) > self.config.spec_num_tokens + 1
                or not graphs.can_run(num_rows, width)):
            return False
        positions, slots, seq_lens, row_tables = [], [], [], []
        for table, s, n in zip(tables, starts, counts):
            for p in range(s, s + n):
                positions.append(p)
                slots.append(table[p // ps] * ps + p % ps)
                seq_lens.append(p + 1)
                row_tables.append(table)
        dev = self.kv.to_device
        features, tokens = graphs.run_rows(dev(ids, torch.int64), hidden, dev(positions, torch.int64),
                                           dev(slots, torch.int64), seq_lens,
                                           dev(self.kv._table(row_tables, width), torch.int32))
        if lasts:
            self._store(lasts, features, tokens)
        return True

    @torch.inference_mode()
    def propose(self, reqs: list[Request], num_tokens: list[int]) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in reqs]
        rows = []  # (index, drafts, state)
        for i, (req, m) in enumerate(zip(reqs, num_tokens)):
            slot = self.valid_slot(req)
            if slot is None:
                continue  # no catch-up of its last position yet (or a stale one): no draft this step
            m = min(m, self._room(req, _length(req), 2))  # draft step j >= 1 writes position length - 2 + j
            if m > 0:
                rows.append((i, m, slot))
        if not rows:
            return out
        rows.sort(key=lambda r: -r[1])
        slots = self.kv.to_device([slot for _, _, slot in rows], torch.int64)
        drafts = self.tokens.index_select(0, slots)[None]  # [1, B]: d1 of every row
        if rows[0][1] > 1:
            picked = [reqs[i] for i, _, _ in rows]
            steps = self.kv.steps([r.page_table for r in picked], [_length(r) - 1 for r in picked],
                                  [m - 1 for _, m, _ in rows])
            features = self.features.index_select(0, slots)  # [B, H]
            drafts = torch.cat([drafts, self.kv.decode(self._step, self.graphs, drafts[0], features, steps)])
            self.num_forwards += len(steps.active)
        for (i, m, _), d in zip(rows, drafts.T.tolist()):
            out[i] = d[:m]
            self.num_tokens += m
        return out

    def load(self, source) -> None:
        """New head weights: a directory saved by save_eagle, or (name, tensor) pairs of every weight; all
        checked before any is copied (a bad load keeps the old head). Copies in place: graphs stay valid."""
        if isinstance(source, (str, os.PathLike)):
            cfg_path = os.path.join(source, "config.json")
            if not os.path.isfile(cfg_path):
                raise FileNotFoundError(f"{str(source)!r} is not an EAGLE head directory (no config.json)")
            with open(cfg_path) as f:
                archs = json.load(f).get("architectures") or []
            if ARCH not in archs:
                raise ValueError(f"{str(source)!r} holds {archs}, not a {ARCH}")
            tensors = dict(iterate_safetensors(safetensors_files(source)))
        else:
            tensors = dict(source)
        if not all(isinstance(t, torch.Tensor) for t in tensors.values()):
            raise ValueError("EAGLE head weights must be torch tensors")
        load_into(self.head, tensors)


@dataclass
class _Written:
    req: Request
    start: int  # position of its first draft step (the request's last token at proposal time)
    tokens: list[int]  # tokens whose KV the draft steps wrote at start, start + 1, ...


class DraftModelDrafter(_ModelDrafter):
    """A small causal LM sharing the target's vocabulary, built with gyre's model classes."""

    name = "draft"

    def __init__(self, runner, config: EngineConfig) -> None:
        _check_single_rank(runner, config)
        path = _draft_path(config, "an HF causal LM directory")
        cfg = _hf_config(path, "draft model")
        if int(cfg.vocab_size) != runner.vocab_size:
            raise ValueError(f"draft model {path!r}: vocab_size {cfg.vocab_size} differs from the target's "
                             f"{runner.vocab_size} (the draft must share the target's tokenizer)")
        try:
            cls = model_class(cfg)
        except ValueError as e:
            raise ValueError(f"draft model {path!r}: {e}") from e
        with torch.device(runner.device):
            self.model = cls(cfg, runner.dtype)
        self.model.eval()
        load_checkpoint(self.model, path)
        kv = DraftKV(runner, cfg.num_hidden_layers, cfg.num_key_value_heads, _head_dim(cfg))
        super().__init__(runner, config, kv, int(cfg.max_position_embeddings), None)

    def _step(self, tokens, hidden, positions, ctx):
        return None, self.model.compute_logits(self.model(tokens, positions, ctx)).argmax(-1)

    @torch.inference_mode()
    def observe(self, out: TargetOutput) -> None:
        self._purge()
        tables, starts, counts, ids = [], [], [], []
        for req, s, n in zip(out.reqs, out.starts, out.num_valid):
            toks = req.token_range(s, s + n)
            w = self.states.pop(req.request_id, None)
            if w is not None and w.req is req and w.start == s:  # its draft steps wrote these tokens' KV
                skip = 0
                while skip < min(n, len(w.tokens)) and w.tokens[skip] == toks[skip]:
                    skip += 1
                s, n, toks = s + skip, n - skip, toks[skip:]
            if n <= 0 or self._room(req, s + n, 0) < 0:
                continue
            tables.append(req.page_table)
            starts.append(s)
            counts.append(n)
            ids.extend(toks)
        if not counts:
            return
        ctx, positions = self.kv.extend(tables, starts, counts)
        self.model(self.kv.to_device(ids, torch.int64), positions, ctx)  # writes the draft's KV
        self.num_forwards += 1

    @torch.inference_mode()
    def propose(self, reqs: list[Request], num_tokens: list[int]) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in reqs]
        rows = []  # (index, drafts, length)
        for i, (req, m) in enumerate(zip(reqs, num_tokens)):
            length = _length(req)
            m = min(m, self._room(req, length, 1))  # step j >= 0 writes position length - 1 + j
            if m > 0 and length > 0:
                rows.append((i, m, length))
        if not rows:
            return out
        rows.sort(key=lambda r: -r[1])
        last = [reqs[i].token_range(n - 1, n)[0] for i, _, n in rows]
        steps = self.kv.steps([reqs[i].page_table for i, _, _ in rows], [n - 1 for _, _, n in rows],
                              [m for _, m, _ in rows])
        drafts = self.kv.decode(self._step, self.graphs, self.kv.to_device(last, torch.int64), None, steps)
        self.num_forwards += len(steps.active)
        for (i, m, n), x, d in zip(rows, last, drafts.T.tolist()):
            out[i] = d[:m]
            self.num_tokens += m
            self.states[reqs[i].request_id] = _Written(reqs[i], n - 1, [x] + d[:m - 1])
        return out

    def load(self, source) -> None:
        """New draft weights: an HF directory (every weight), or (HF name, tensor) pairs (any subset); all
        checked before any is copied (a bad load keeps the old draft). Copies in place: graphs stay valid."""
        if isinstance(source, (str, os.PathLike)):
            tensors, complete = dict(iterate_safetensors(safetensors_files(source))), True
        else:
            tensors, complete = dict(source), False
        specs = self.model.hf_weight_specs()
        bad = []
        for name, t in tensors.items():
            try:
                target = self.model.resolve(name)
            except KeyError:
                bad.append(f"unknown {name!r}")
                continue
            if target is None:
                continue
            want = specs.get(name) or specs["model.embed_tokens.weight"]  # only a tied lm_head has no spec
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or tuple(t.shape) != tuple(want):
                got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                bad.append(f"{name!r}: {got}, expected floating point {tuple(want)}")
        if complete:
            bad += [f"missing {name!r}" for name in sorted(set(specs) - set(tensors))]
        if bad:
            raise ValueError(f"draft model weights rejected, nothing loaded: {'; '.join(bad[:5])}")
        self.model.load_weights(tensors.items())


def _length(req: Request) -> int:
    """len(req.all_ids) without building the list."""
    return len(req.prompt_ids) + len(req.output_ids)


def _head_dim(cfg: Any) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _check_single_rank(runner, config: EngineConfig) -> None:
    if runner.parallel.world_size > 1:
        raise ValueError(f"spec_method={config.spec_method!r} needs tp_size = ep_size = 1 (the draft runs on "
                         f"one device)")


def _draft_path(config: EngineConfig, what: str) -> str:
    if not config.spec_draft_path:
        raise ValueError(f"spec_method={config.spec_method!r} needs spec_draft_path ({what})")
    return str(config.spec_draft_path)


def _hf_config(path: str, what: str) -> Any:
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{what} {path!r} is not an HF model directory (no config.json)")
    try:
        return AutoConfig.from_pretrained(path)
    except Exception as e:  # transformers raises its own types for an unknown model_type or bad JSON
        raise ValueError(f"{what} {path!r}: cannot read config.json: {e}") from e
