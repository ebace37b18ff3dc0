"""The EAGLE speculative step on the device: draft, verify, accept and catch up in one launch.

For a batch of decoding requests that each have a current EAGLE state (the head's feature and first
draft, in the drafter's per-request slots), one step
  1. drafts: d_1 from the slot, then k - 1 head steps, each fed the previous step's feature and token;
  2. verifies: the target over the last token and the drafts as 1 + k decode rows per request (row j,
     at position L + j, attends to positions <= L + j), every row sampled as plain decoding would sample
     it (the request's noise for its token num_generated + j; gyre.engine.spec.verify);
  3. accepts on the device: a = the number of leading drafts equal to the target's samples;
  4. catches up: the head over rows 0..a (token x_{p+1} = the target's sample at row p, hidden h_p, the
     target's), writing the head's KV there; row a's feature and argmax token are the new state;
  5. advances its own inputs: L, the last token, the generated count and the next draft count, so the
     next step of the same requests needs nothing from the host but page tables (`launch_next`).
The host copies the inputs in once and the drafts, samples, logprobs, accepted and draft counts out once;
nothing in between waits for it. On CUDA each batch bucket's step is one CUDA graph. The engine queues step
t + 1 before it resolves step t (Engine._spec_step), reserving pages for the most step t can accept. The
host appends the tokens as a verify of the same drafts on the host-driven path would
(Scheduler.resolve_spec), so outputs do not depend on the path.

A request's draft count m <= k (fewer near max_new_tokens or the context end, or when pages are short)
masks its rows past m: no KV store, never accepted. Bucket padding rows and finished requests' rows have
m = -1 (nothing stored or read; their state row is the scratch slot). Rejected rows' KV (target and head)
is rewritten before it is read, as on the host-driven path.
"""

from __future__ import annotations

import torch

from gyre.engine.config import EngineConfig
from gyre.engine.cuda_graph import batch_buckets, capture_stream
from gyre.engine.layers.attention import AttentionMetadata
from gyre.engine.model_runner import ForwardContext
from gyre.engine.request import Request, Status
from gyre.engine.sampler import SampleOutput, is_filtered, sample_rows
from gyre.engine.scheduler import ScheduledBatch
from gyre.kernels.spec import spec_epilogue, spec_epilogue_ref, spec_prologue, spec_prologue_ref

# columns of the int64 inputs, one row per request (the step advances the first five itself)
SLOT, LAST, START, COUNT, GENERATED, SEED, TOP_K, MAX_GENERATED, CAP = range(9)  # as gyre.kernels.spec
NUM_INTS = 9


class _Host:
    """Pinned host buffers of one launch (two alternate, so a launch never overwrites what the previous
    one's copies still read or write)."""

    def __init__(self, max_bs: int, k: int, max_pages: int, pin: bool) -> None:
        self.ints = torch.zeros(max_bs, NUM_INTS, dtype=torch.int64, pin_memory=pin)
        self.floats = torch.zeros(max_bs, 3, dtype=torch.float32, pin_memory=pin)
        self.alive = torch.zeros(max_bs, dtype=torch.int64, pin_memory=pin)
        self.table = torch.zeros(max_bs, max_pages, dtype=torch.int32, pin_memory=pin)
        self.out = torch.zeros(max_bs, 2 * k + 3, dtype=torch.int64, pin_memory=pin)
        self.logprobs = torch.zeros(max_bs, k + 1, dtype=torch.float32, pin_memory=pin)


class FusedEagle:
    """Static buffers and per-bucket CUDA graphs of the fused step (eager on the CPU or without graphs)."""

    def __init__(self, drafter, runner, config: EngineConfig) -> None:
        self.drafter, self.runner = drafter, runner
        self.k = k = config.spec_num_tokens
        self.device = dev = runner.device
        self.page_size = ps = runner.pool.page_size
        self.use_graphs = dev.type == "cuda" and config.cuda_graph
        if self.use_graphs:
            self.max_bs = min(config.cuda_graph_max_bs, config.max_running_requests)
            max_seq = min(config.cuda_graph_max_seq_len, runner.max_model_len)
        else:
            self.max_bs, max_seq = config.max_running_requests, runner.max_model_len
        self.max_pages = -(-(max_seq + 2 * k + 2) // ps)  # a continued step's worst case fits too
        # tokens a request may reach: positions stay inside the target's and the head's rotary tables
        self.max_tokens = min(runner.max_model_len, drafter.max_positions)
        self.buckets = batch_buckets(self.max_bs)
        pin = dev.type == "cuda"
        self.host = [_Host(self.max_bs, k, self.max_pages, pin) for _ in range(2)]
        self.turn = 0
        self.ints = torch.zeros(self.max_bs, NUM_INTS, dtype=torch.int64, device=dev)
        self.floats = torch.zeros(self.max_bs, 3, dtype=torch.float32, device=dev)
        self.alive = torch.zeros(self.max_bs, dtype=torch.int64, device=dev)
        self.table = torch.zeros(self.max_bs, self.max_pages, dtype=torch.int32, device=dev)
        self.out = torch.zeros(self.max_bs, 2 * k + 3, dtype=torch.int64, device=dev)  # drafts, samples, a, m
        self.out_logprobs = torch.zeros(self.max_bs, k + 1, dtype=torch.float32, device=dev)
        self.cu = torch.arange(self.max_bs * (k + 1) + 1, dtype=torch.int32, device=dev)
        cfg = runner.hf_config
        gqa = cfg.num_attention_heads // cfg.num_key_value_heads
        from gyre.kernels.attention import shared_prefix_max_rows

        # a request's 1 + k verify rows share its pages: one group (read once) where the backend groups rows
        self.share = config.shared_prefix_decode and k + 1 <= shared_prefix_max_rows(gqa)
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self.graph_pool = None
        self.num_steps = 0
        self.num_continued = 0

    # -- host ---------------------------------------------------------------------------------------
    def plan(self, batch: ScheduledBatch, budgets: list[int]) -> list[tuple[int, int]] | None:
        """(slot, draft count) of every request when the whole batch can run fused, else None: every request
        decodes one token with a current state, no grammar, top logprobs or expert capture, and fits."""
        if len(batch.reqs) > self.max_bs or not any(budgets):
            return None
        ps, drafter, plan = self.page_size, self.drafter, []
        for req, n, samples, budget in zip(batch.reqs, batch.num_new, batch.sampling, budgets):
            sp = req.sampling
            if (n != 1 or not samples or req.num_pending or req.grammar is not None or sp.top_logprobs
                    or sp.return_routed_experts):
                return None
            slot = drafter.valid_slot(req)
            if slot is None:
                return None
            length = req.num_tokens
            room = min(len(req.page_table) * ps, self.max_tokens) - length  # catch-up writes up to L + m
            m = max(0, min(budget, room))
            if -(-(length + m) // ps) > self.max_pages:
                return None
            plan.append((slot, m))
        return plan

    def launch(self, batch: ScheduledBatch, plan: list[tuple[int, int]]) -> FusedHandle:
        """Queue the step of a scheduled batch (inputs in, the graph or the eager step, outputs out)."""
        n = len(batch.reqs)
        bs = next(b for b in self.buckets if b >= n) if self.use_graphs else n
        filtered = is_filtered([r.sampling for r in batch.reqs], self.runner.vocab_size)
        self._ensure_graph(bs, filtered)
        host = self._next_host()
        ints, floats = host.ints.numpy(), host.floats.numpy()
        cap = self.max_tokens - 1  # the last token a request may hold (tokens < max_tokens)
        for i, (req, (slot, m)) in enumerate(zip(batch.reqs, plan)):
            sp = req.sampling
            ints[i] = (slot, req.output_ids[-1] if req.output_ids else req.prompt_ids[-1], req.num_tokens - 1, m,
                       req.num_generated, req.seed, sp.top_k, sp.max_new_tokens, cap)
            floats[i] = (sp.temperature, sp.top_p, sp.min_p)
        ints[n:bs] = (self.drafter.scratch_slot, 0, 0, -1, 0, 0, 0, 0, 0)
        self.ints[:bs].copy_(host.ints[:bs], non_blocking=True)
        self.floats[:bs].copy_(host.floats[:bs], non_blocking=True)
        alive = [True] * n
        return self._launch(batch, host, bs, filtered, alive, continued=False)

    def launch_next(self, prev: FusedHandle, alive: list[bool]) -> FusedHandle:
        """Queue the next step of prev's requests from the inputs prev's step leaves on the device, before
        prev is resolved; rows not alive (finished since) are masked. The caller reserved the pages."""
        reqs = prev.batch.reqs
        batch = ScheduledBatch(reqs, [1] * len(reqs), sampling=[True] * len(reqs))
        self.num_continued += 1
        return self._launch(batch, self._next_host(), prev.bs, prev.filtered, alive, continued=True)

    def fits_next(self, req: Request) -> bool:
        """Whether a continued step of req stays inside the rotary tables whatever the in-flight one accepts."""
        return req.num_tokens + 2 * self.k + 1 <= self.max_tokens

    def _next_host(self) -> _Host:
        self.turn ^= 1
        return self.host[self.turn]

    def _launch(self, batch: ScheduledBatch, host: _Host, bs: int, filtered: bool, alive: list[bool],
                continued: bool) -> FusedHandle:
        n = len(batch.reqs)
        table, live = host.table.numpy(), host.alive.numpy()
        width = 1
        for i, (req, a) in enumerate(zip(batch.reqs, alive)):
            live[i] = a
            if a:
                pages = req.page_table
                used = min(len(pages), self.max_pages)
                table[i, :used] = pages[:used]
                width = max(width, used)
        live[n:bs] = 0
        width = self.max_pages if self.use_graphs else width
        self.alive[:bs].copy_(host.alive[:bs], non_blocking=True)
        self.table[:bs, :width].copy_(host.table[:bs, :width], non_blocking=True)
        if self.use_graphs:
            self.graphs[(bs, filtered)].replay()
        else:
            with torch.inference_mode():
                self._step(bs, width, filtered, eager=True)
        self.num_steps += 1
        out, logprobs = host.out[:n], host.logprobs[:n]
        out.copy_(self.out[:n], non_blocking=True)
        logprobs.copy_(self.out_logprobs[:n], non_blocking=True)
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        return FusedHandle(self, batch, bs, filtered, out, logprobs, event)

    def drop_graphs(self) -> None:
        self.graphs.clear()
        self.graph_pool = None

    @torch.inference_mode()
    def _ensure_graph(self, bs: int, filtered: bool) -> None:
        if not self.use_graphs or (bs, filtered) in self.graphs:
            return
        self.alive[:bs] = 0  # the warm-up run below computes nothing but padding
        stream = capture_stream(self.device)
        stream.wait_stream(torch.cuda.current_stream())
        if self.graph_pool is None:
            self.graph_pool = torch.cuda.graph_pool_handle()
        with torch.cuda.stream(stream):
            self._step(bs, self.max_pages, filtered, eager=False)  # Triton compiles outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.graph_pool, stream=stream):
                self._step(bs, self.max_pages, filtered, eager=False)
        torch.cuda.current_stream().wait_stream(stream)
        self.graphs[(bs, filtered)] = graph

    # -- device -------------------------------------------------------------------------------------
    def _meta(self, table: torch.Tensor, slots: torch.Tensor, seq_lens: torch.Tensor, eager: bool,
              shared: tuple[torch.Tensor, torch.Tensor] | None = None) -> AttentionMetadata:
        """Decode metadata of independent rows (row r attends to the first seq_lens[r] positions of
        table[r]); host lengths only when eager (the torch backend reads them; captured steps cannot)."""
        rows = slots.shape[0]
        lens_cpu = seq_lens.tolist() if eager else [1] * rows
        return AttentionMetadata(slot_mapping=slots, page_table=table, seq_lens=seq_lens,
                                 cu_seqlens_q=self.cu[:rows + 1], max_q_len=1, seq_lens_cpu=lens_cpu,
                                 q_lens_cpu=[1] * rows, is_decode=True,
                                 prefix_lens=None if shared is None else shared[0],
                                 group_lens=None if shared is None else shared[1])

    def _step(self, bs: int, width: int, filtered: bool, eager: bool) -> None:
        k, drafter, runner = self.k, self.drafter, self.runner
        ints, table = self.ints[:bs], self.table[:bs, :width]
        on_gpu = self.device.type == "cuda"  # the index arithmetic in two kernels (gyre.kernels.spec)
        prologue, epilogue = (spec_prologue, spec_epilogue) if on_gpu else (spec_prologue_ref, spec_epilogue_ref)
        pro = prologue(ints, self.alive[:bs], self.floats[:bs], table, k, self.page_size, drafter.scratch_slot)
        # 1) drafts: d_1 from the state, then k - 1 head steps (step s at position L + s makes d_{s+2})
        slot = pro["slot"]
        feature, token = drafter.features.index_select(0, slot), drafter.tokens.index_select(0, slot)
        drafts = [token]
        for s in range(k - 1):
            meta = self._meta(table, pro["step_slots"][s], pro["step_lens"][s], eager)
            if eager:
                drafter.kv.backend.prepare(meta)
            feature, token = drafter._step(token, feature, pro["step_pos"][s],
                                           ForwardContext(drafter.kv.backend, meta))
            drafts.append(token)
        drafts = torch.stack(drafts, 1)  # [B, k]
        # 2) verify: rows j = 0..k at positions L + j (rows past m: nothing stored, row 0's length)
        rows = bs * (k + 1)
        row_table = table.repeat_interleave(k + 1, 0)
        shared = None
        if self.share and runner.backend.decodes_shared_prefix(rows):
            shared = (pro["prefix_lens"], pro["group_lens"])
        meta = self._meta(row_table, pro["verify_slots"], pro["verify_lens"], eager, shared)
        if eager:
            runner.backend.prepare(meta)
        ids = torch.cat([ints[:, LAST, None], drafts], 1).reshape(rows)
        positions = pro["positions"].reshape(rows)
        hidden = runner.model(ids, positions, ForwardContext(runner.backend, meta))
        logits = runner.model.compute_logits(hidden)
        samples, logprobs = sample_rows(logits, pro["temperature"], pro["top_k"], pro["top_p"], pro["min_p"],
                                        pro["seeds"], pro["steps"], filtered)
        samples = samples.view(bs, k + 1)
        # 3) accept (the leading drafts equal to the target's samples); the next step's inputs, in place
        epi = epilogue(ints, pro, drafts, samples, k)
        # 4) catch up over rows 0..a: the head reads (embed(sample_j) = x_{L+j+1}, h_{L+j}) at L + j
        meta = self._meta(row_table, epi["catch_slots"], epi["catch_lens"], eager)
        if eager:
            drafter.kv.backend.prepare(meta)
        features = drafter.head(drafter.embed(samples.reshape(rows)), hidden, positions,
                                ForwardContext(drafter.kv.backend, meta))
        new_feature = features.index_select(0, epi["pick"])
        drafter.features.index_copy_(0, slot, new_feature)
        drafter.tokens.index_copy_(0, slot, runner.model.compute_logits(new_feature).argmax(-1))
        self.out[:bs].copy_(epi["out"])
        self.out_logprobs[:bs].copy_(logprobs.view(bs, k + 1))


class FusedHandle:
    """A launched fused step; wait() sets the batch's drafts and returns its samples as a verify's rows."""

    experts = None
    is_fused = True

    def __init__(self, fused: FusedEagle, batch: ScheduledBatch, bs: int, filtered: bool, out: torch.Tensor,
                 logprobs: torch.Tensor, event) -> None:
        self.owner, self.batch, self.bs, self.filtered = fused, batch, bs, filtered
        self.starts: list[int] = []
        self._out, self._logprobs, self._event = out, logprobs, event

    def wait(self) -> SampleOutput:
        """The step's rows once it is done; the batch's drafts and counts, and the requests' state positions,
        are set from what the device did (starts: num_computed now, as the step saw it)."""
        if self._event is not None:
            self._event.synchronize()
        fused, batch = self.owner, self.batch
        k, drafter = fused.k, fused.drafter
        out, logprobs = self._out.tolist(), self._logprobs.tolist()
        self.starts = [r.num_computed for r in batch.reqs]
        tokens, lps = [], []
        for i, (req, row, lp) in enumerate(zip(batch.reqs, out, logprobs)):
            running = req.status == Status.RUNNING
            m = max(row[2 * k + 2], 0) if running else 0  # a finished request's row is ignored
            batch.drafts[i] = row[:m]
            batch.num_new[i] = 1 + m
            tokens += row[k:k + 1 + m]
            lps += lp[:1 + m]
            drafter.num_tokens += m
            st = drafter.states.get(req.request_id)
            if st is not None and st.req is req and running:
                st.pos = self.starts[i] + row[2 * k + 1]  # the catch-up's last row
        drafter.num_forwards += k
        return SampleOutput(tokens, lps, [None] * len(tokens))
