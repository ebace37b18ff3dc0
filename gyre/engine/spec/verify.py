"""Speculative decoding in the engine loop: draft, verify in one target forward, accept.

Verification samples the target at every verified position exactly as plain decoding would: row j of
a verifying request uses the request's own noise for its token num_generated + j (counter-based, see
gyre.kernels.random), after the same temperature / top-k / top-p / min-p / grammar mask. Drafts equal
to those samples are accepted, then the target's sample at the first mismatch (or after the last
draft) is appended. For a deterministic draft d this is rejection sampling with acceptance
probability p(d) = min(1, p(d) / q(d)) (q = point mass at d) and a correction drawn from the target
with d excluded, so the output is distributed exactly as the target's; more than that, it is the very
sequence the same seed gives without speculation (up to the numerics of a batch of rows vs one row),
and greedy decoding is token-exact. The returned logprobs are the target's.

The verify forward is a decode batch of 1 + m rows per request over the same pages (row j attends to
positions <= its own), so it runs in the target's CUDA graphs. Rejected positions are rolled back by
num_computed alone: their KV slots are overwritten later and never reach the prefix cache.
"""

from __future__ import annotations

import logging
import traceback
from typing import Any

import torch

from gyre.engine.request import Request, Status
from gyre.engine.sampler import SampleOutput
from gyre.engine.scheduler import ScheduledBatch
from gyre.engine.spec.base import Drafter, TargetOutput

log = logging.getLogger("gyre.engine.spec")

ON_WEIGHT_UPDATE = ("disable", "keep")


def make_drafter(engine) -> Drafter:
    cfg = engine.config
    if cfg.spec_method == "ngram":
        from gyre.engine.spec.ngram import NgramDrafter

        return NgramDrafter()
    from gyre.engine.spec.draft_runner import make_drafter as make_model_drafter

    return make_model_drafter(cfg, engine.runner)


class SpecDecoder:
    """Owns the drafter and the acceptance statistics; called by the engine thread only."""

    def __init__(self, engine, drafter: Drafter) -> None:
        self.config = engine.config
        self.drafter = drafter
        self.vocab_size = engine.vocab_size
        self.max_model_len = engine.max_model_len
        self.grammar_vocab = engine.grammar.vocab_size
        self.active = True
        self.disabled_reason: str | None = None
        self.draft_version = engine.weight_version  # target weight version the draft was last matched to
        self.num_verify_steps = 0  # engine steps that verified drafts
        self.num_verifies = 0  # (request, step) verifications with >= 1 draft
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.num_drafter_errors = 0
        self.verify_seconds = 0.0

    @property
    def needs_hidden(self) -> bool:
        return self.drafter.needs_hidden

    # -- scheduling ---------------------------------------------------------------------------------
    def draft_len(self, req: Request) -> int:
        """Drafts the scheduler may reserve pages for: k, fewer near max_new_tokens / the context end."""
        if not self.active or req.sampling.return_routed_experts or req.num_pending:
            return 0
        left = min(req.sampling.max_new_tokens - req.num_generated, self.max_model_len - req.num_tokens) - 1
        return max(0, min(self.config.spec_num_tokens, left))

    def attach(self, batch: ScheduledBatch) -> None:
        """Ask the drafter for the batch's decoding requests' drafts; grammar-invalid tails are cut."""
        idx = [i for i, b in enumerate(batch.draft_budget) if b > 0 and batch.sampling[i]]
        if not idx or not self.active:
            return
        reqs = [batch.reqs[i] for i in idx]
        try:
            proposals = self.drafter.propose(reqs, [batch.draft_budget[i] for i in idx])
        except Exception:  # noqa: BLE001 - a drafter bug costs speed, never a request
            self.num_drafter_errors += 1
            log.error("drafter %s failed; verifying no drafts this step: %s", self.drafter.name,
                      traceback.format_exc())
            return
        for i, req, drafts in zip(idx, reqs, proposals):
            drafts = [int(t) for t in list(drafts)[: batch.draft_budget[i]]]
            cut = next((j for j, t in enumerate(drafts) if not 0 <= t < self.vocab_size), len(drafts))
            drafts = drafts[:cut]
            if req.grammar is not None and drafts:
                drafts = _grammar_prefix(req, drafts)
            batch.drafts[i] = drafts
            batch.num_new[i] = 1 + len(drafts)

    def launch_fused(self, batch: ScheduledBatch):
        """The step drafted, verified and caught up on the device in one launch (gyre.engine.spec.fused),
        when the drafter has that path and the whole batch can take it; else None (the host drives it)."""
        fused = getattr(self.drafter, "fused", None)
        if fused is None or not self.active:
            return None
        plan = fused.plan(batch, batch.draft_budget)
        if plan is None:
            return None
        try:
            return fused.launch(batch, plan)
        except Exception:  # noqa: BLE001 - e.g. a capture that fails: the host-driven path serves from now on
            self.num_drafter_errors += 1
            self.drafter.fused = None
            log.error("the fused EAGLE step failed; speculating host-driven from now on: %s", traceback.format_exc())
            return None

    def continue_fused(self, handle, scheduler) -> Any:
        """The next fused step of the in-flight `handle`'s requests, queued before handle is resolved, from
        what its step leaves on the device; None when the batch has to change first: a request is waiting
        or running outside it, none is left, one nears the context end, or pages for the most the
        in-flight step can accept (k + 1 tokens) plus the next step's drafts are not free."""
        fused = handle.owner
        reqs = handle.batch.reqs
        if not self.active or scheduler.waiting:
            return None
        # the in-flight step appends >= 1 token: a request it surely finishes takes no part in the next one
        alive = [r.status == Status.RUNNING and r.num_generated + 1 < r.sampling.max_new_tokens
                 and r.num_tokens + 1 < self.max_model_len for r in reqs]
        running = sum(r.status == Status.RUNNING for r in reqs)
        if not any(alive) or running != len(scheduler.running):  # everyone running is in this batch
            return None
        k = self.config.spec_num_tokens
        for req, a in zip(reqs, alive):
            if a and not (fused.fits_next(req) and scheduler.reserve_free(req, req.num_tokens + 2 * k + 1)):
                return None
        return fused.launch_next(handle, alive)

    def masks(self, batch: ScheduledBatch, pin: bool) -> torch.Tensor | None:
        """Grammar bitmask of every sampled row: a verify's row j is masked by the state after its first
        j drafts (matchers advance over the drafts and roll back)."""
        rows = batch.num_rows
        if not any(r.grammar is not None and n for r, n in zip(batch.reqs, rows)):
            return None
        width = (self.grammar_vocab + 31) // 32
        bitmask = torch.empty((sum(rows), width), dtype=torch.int32, pin_memory=pin)
        bitmask.numpy().fill(-1)
        row = 0
        for req, n, drafts in zip(batch.reqs, rows, batch.drafts):
            if req.grammar is not None and n and not req.is_finished:
                for j in range(n):
                    req.grammar.matcher.fill_next_token_bitmask(bitmask, row + j)
                    if j < len(drafts):
                        req.grammar.accept(drafts[j])
                if drafts:
                    req.grammar.rollback(len(drafts))
            row += n
        return bitmask

    # -- after the step -----------------------------------------------------------------------------
    def split(self, batch: ScheduledBatch, out: SampleOutput) -> list[tuple[list[int], list[float], list]]:
        """The step's sampled rows, per request."""
        rows, k = [], 0
        for n in batch.num_rows:
            rows.append((out.tokens[k:k + n], out.logprobs[k:k + n], out.top_logprobs[k:k + n]))
            k += n
        return rows

    def after_step(self, batch: ScheduledBatch, starts: list[int], accepted: list[int],
                   hidden: torch.Tensor | None, seconds: float) -> None:
        verified = [bool(d) for d in batch.drafts]
        if any(verified):
            self.num_verify_steps += 1
            self.verify_seconds += seconds
        for drafts, a in zip(batch.drafts, accepted):
            if drafts:
                self.num_verifies += 1
                self.num_draft_tokens += len(drafts)
                self.num_accepted_tokens += a
        if not self.active:
            return
        reqs, st, valid, rows = [], [], [], []
        row = 0
        for req, start, n, drafts, a in zip(batch.reqs, starts, batch.num_new, batch.drafts, accepted):
            if req.status == Status.RUNNING:
                reqs.append(req)
                st.append(start)
                valid.append(a + 1 if drafts else n)
                rows.append(row)
            row += n
        if not reqs:
            return
        try:
            self.drafter.observe(TargetOutput(reqs, st, valid, rows, hidden if self.needs_hidden else None))
        except Exception:  # noqa: BLE001
            self.num_drafter_errors += 1
            log.error("drafter %s failed to observe a step: %s", self.drafter.name, traceback.format_exc())

    # -- control ------------------------------------------------------------------------------------
    def on_weights_updated(self, version: int) -> None:
        """A model draft was fitted to older weights: it is disabled until Engine.load_draft, unless
        spec_on_weight_update = "keep" (then it keeps drafting, knowingly stale). N-grams have no weights."""
        self.drafter.on_weights_updated(version)
        if self.drafter.name == "ngram" or self.config.spec_on_weight_update == "keep":
            return
        self.active = False
        self.disabled_reason = (f"weights updated to version {version} after the draft was loaded; "
                                "load a new draft with Engine.load_draft")

    def load(self, source: Any, version: int) -> None:
        self.drafter.load(source)  # validates everything first: a bad draft keeps the old one
        self.active = True
        self.disabled_reason = None
        self.draft_version = version

    def stats(self) -> dict[str, Any]:
        v = self.num_verifies
        fused = getattr(self.drafter, "fused", None)
        return {
            "spec_method": self.drafter.name,
            "spec_active": self.active,
            "spec_disabled_reason": self.disabled_reason,
            "spec_draft_version": self.draft_version,
            "spec_num_verify_steps": self.num_verify_steps,
            "spec_num_verifies": v,
            "spec_num_draft_tokens": self.num_draft_tokens,
            "spec_num_accepted_tokens": self.num_accepted_tokens,
            "spec_acceptance_rate": self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0,
            "spec_mean_accept_len": (self.num_accepted_tokens + v) / v if v else 0.0,
            "spec_verify_step_ms": 1e3 * self.verify_seconds / self.num_verify_steps if self.num_verify_steps else 0.0,
            "spec_drafter_errors": self.num_drafter_errors,
            "spec_fused_steps": fused.num_steps if fused is not None else 0,
            # fused steps queued from the previous one's device state, before it was resolved
            "spec_fused_continued": fused.num_continued if fused is not None else 0,
            **self.drafter.stats(),
        }


def _grammar_prefix(req: Request, drafts: list[int]) -> list[int]:
    """The longest prefix of drafts the request's grammar accepts without completing (a draft that would
    end the grammar is left to the target's own sample); the matcher is left as it was."""
    g, n = req.grammar, 0
    for tok in drafts:
        if not g.accept(tok):
            break
        n += 1
        if g.is_terminated:
            break
    if n and g.is_terminated:
        g.rollback(1)
        n -= 1
    if n:
        g.rollback(n)
    return drafts[:n]


