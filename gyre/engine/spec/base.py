"""The drafter interface of speculative decoding, and what a drafter sees of each target step.

A drafter proposes up to k tokens continuing a decoding request; the target verifies them all in one
forward (gyre.engine.spec.verify). Drafts never change what is generated, only how fast: a wrong or
stale draft costs acceptance, never correctness. So a drafter may be approximate (skip work, leave its
own KV stale after a prefix-cache hit) but must never raise on ordinary input.

Model drafters (a draft LM, an EAGLE head) keep their own KV in a pool that mirrors the target's pages:
same page size and page count, so a request's page_table addresses both, and the target's page
allocation, prefix cache and retraction need no drafter-specific bookkeeping.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gyre.engine.request import Request


@dataclass
class TargetOutput:
    """One resolved target forward, as a drafter sees it.

    For request i, positions [starts[i], starts[i] + num_valid[i]) were computed by this step and are
    final (a prefill chunk, or a verify's last token + accepted drafts); their target hidden states are
    hidden[rows[i] : rows[i] + num_valid[i]] (final-norm output, the lm_head's input), when the drafter
    asked for them (Drafter.needs_hidden). Tokens are reqs[i].all_ids (already appended): the token at
    position p is all_ids[p]; the token after the last valid position may be the newest output token.
    """

    reqs: list[Request]
    starts: list[int]
    num_valid: list[int]
    rows: list[int]
    hidden: torch.Tensor | None


class Drafter:
    """Base class. Called on the engine thread only, between steps."""

    name = "none"
    needs_hidden = False  # TargetOutput.hidden is filled (costs keeping [T, H] per step)

    def propose(self, reqs: list[Request], num_tokens: list[int]) -> list[list[int]]:
        """Up to num_tokens[i] draft tokens continuing reqs[i].all_ids (resolved: nothing pending; the last
        token's KV is not computed yet). Pages for positions up to len(all_ids) + num_tokens[i] - 1 are
        reserved in reqs[i].page_table, so a model drafter may write its KV there."""
        raise NotImplementedError

    def observe(self, out: TargetOutput) -> None:
        """After every target step (prefill chunks, decodes, verifies) once its tokens are appended."""

    def on_weights_updated(self, version: int) -> None:
        """The target's weights changed (the engine decides, by EngineConfig.spec_on_weight_update,
        whether this drafter is used any more until a new draft is loaded)."""

    def load(self, source) -> None:
        """New draft weights (a directory or named tensors); model drafters only."""
        raise ValueError(f"the {self.name!r} drafter has no weights to load")

    def stats(self) -> dict:
        return {}

    def on_memory_released(self) -> None:
        """Engine.release_memory(kv_cache): drop device buffers that mirror the target's KV."""

    def on_memory_resumed(self) -> None:
        """Engine.resume_memory(kv_cache): allocate them again (their contents are not needed)."""
