"""The engine thread's loop (Engine's base class): messages from callers, steps, their resolution.

Every method here runs on the engine thread. The state it uses (scheduler, runner, spec decoder, inbox,
the step in flight) is built by Engine.__init__ (gyre.engine.engine).
"""

from __future__ import annotations

import logging
import queue
import time
import traceback
from collections.abc import Callable

import torch

from gyre.engine.parallel import set_parallel_state
from gyre.engine.request import Status
from gyre.engine.scheduler import NeedSync

log = logging.getLogger("gyre.engine")


class EngineLoop:
    def _handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "add":
            req = msg[1]
            req.arrival = next(self._arrival)
            self._requests[req.request_id] = req
            self.scheduler.add(req)
        elif kind == "abort":
            targets = list(self._requests.values()) if msg[1] is None else [self._requests.get(msg[1])]
            for req in targets:
                if req is not None and req.status != Status.FINISHED:
                    self.scheduler.finish(req, "abort", "aborted by the caller")
        elif kind == "call":
            _, fn, fut = msg
            self._sync()  # control calls see no step in flight
            try:
                fut.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - the caller gets the error
                fut.set_exception(e)
        elif kind == "stop":
            self._stopped = True

    def _drain(self, block: bool) -> None:
        try:
            msg = self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        self._handle(msg)
        while True:
            try:
                self._handle(self._inbox.get_nowait())
            except queue.Empty:
                return

    def _loop(self) -> None:
        """Overlapped: while step t runs on the device, the host schedules and launches step t+1, then
        resolves step t. Control calls, retraction and MoE routing capture resolve the in-flight step
        first, so they always see a settled state."""
        set_parallel_state(self.runner.parallel)  # this thread runs the model's collectives (tp/ep > 1)
        while not self._stopped:
            held = self._paused or self._paused_for_memory
            self._drain(block=(self.scheduler.is_idle or held) and self._inflight is None)
            if self._stopped:
                break
            if self._paused or self._paused_for_memory:  # re-read: the drain may have just paused
                self._sync()
                continue
            self._expire_sessions()
            if self.spec is not None:
                self._spec_step()
                continue
            overlap = self.config.overlap_schedule and self._inflight is not None
            try:
                batch = self.scheduler.schedule(overlap=overlap)
            except NeedSync:
                self._sync()
                batch = self.scheduler.schedule()
            handle = None
            if batch is not None:
                try:
                    handle = self.runner.launch(batch, self._inflight, self._grammar_masks(batch))
                except Exception as e:  # a failed step ends its requests, never the engine
                    self._fail(batch, e)
                else:
                    self.scheduler.advance(batch)
                    self._step_count += 1
            self._sync()
            self._inflight = handle
            if handle is not None and (not self.config.overlap_schedule or handle.experts):
                self._sync()
            if batch is None and self._inflight is None:
                self._idle_checks()
        self._sync()
        while True:  # messages that arrived after stop: calls fail, requests end with "abort"
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                break
            if msg[0] == "call":
                msg[2].set_exception(RuntimeError("the engine is shut down"))
            elif msg[0] == "add":
                self._requests[msg[1].request_id] = msg[1]
                self.scheduler.add(msg[1])
        for req in list(self._requests.values()):  # shutdown: nothing accepted is lost silently
            self.scheduler.finish(req, "abort", "engine shut down")

    def _spec_step(self) -> None:
        """One step with speculative decoding. A fused EAGLE step (gyre.engine.spec.fused) stays in flight:
        the next iteration queues the step after it from the device state (same requests), then resolves
        it. Otherwise: schedule, draft, verify the drafts in one target forward (with the step's prefills),
        accept, let the drafter see the result."""
        inflight = self._inflight
        if inflight is not None:
            try:
                self._inflight = self.spec.continue_fused(inflight, self.scheduler)
            except Exception:  # noqa: BLE001 - a failed launch costs overlap, never a request
                log.error("queueing the next fused step failed: %s", traceback.format_exc())
                self._inflight = None
            if self._inflight is not None:
                self._inflight.launched = time.perf_counter()
            self._resolve_spec(inflight)
            return
        batch = self.scheduler.schedule()
        if batch is None:
            self._idle_checks()
            return
        launched = time.perf_counter()
        try:
            handle = self.spec.launch_fused(batch)  # drafts and catch-up on the device, or None
            if handle is None:
                self.spec.attach(batch)
                masks = self.spec.masks(batch, pin=self.runner.device.type == "cuda")
                handle = self.runner.launch(batch, None, masks)
        except Exception as e:  # a failed step ends its requests, never the engine
            self._fail(batch, e)
            return
        handle.launched = launched
        if getattr(handle, "is_fused", False) and self.config.overlap_schedule:
            self._inflight = handle  # resolved once the next step is queued behind it
            return
        self._resolve_spec(handle)

    def _resolve_spec(self, handle) -> None:
        """Wait for a speculative step, append its accepted tokens, count it, show it to the drafter."""
        batch = handle.batch
        try:
            out = handle.wait()
        except Exception as e:
            self._fail(batch, e)
            return
        self.scheduler.advance(batch)
        self._step_count += 1
        if handle.experts:
            self._record_experts(batch, handle.starts, handle.experts)
        rows = self.spec.split(batch, out)
        before = sum(len(r.output_ids) for r in batch.reqs)
        accepted = self.scheduler.resolve_spec(batch, rows, self._check_stop)
        self._tokens_generated += sum(len(r.output_ids) for r in batch.reqs) - before
        fused = getattr(handle, "is_fused", False)  # its catch-up ran on the device already
        hidden = self.runner.last_hidden if self.spec.needs_hidden and not fused else None
        now = time.perf_counter()
        seconds = now - max(handle.launched, self._last_spec_resolve)  # this step's share when pipelined
        self._last_spec_resolve = now
        self.spec.after_step(batch, handle.starts, accepted, hidden, seconds)

    def _grammar_masks(self, batch) -> Callable[[], torch.Tensor] | None:
        """For a step that samples constrained requests: the bitmask, made once its forward is queued.
        It needs the in-flight step's tokens, so it resolves that step first (matchers advance) while
        the device runs the forward. None when no sampling row is constrained (fully overlapped)."""
        reqs = [r for r, s in zip(batch.reqs, batch.sampling) if s]
        if not any(r.grammar is not None for r in reqs):
            return None

        def fill() -> torch.Tensor:
            self._sync()
            return self.grammar.fill_bitmask(reqs, pin=self.runner.device.type == "cuda")

        return fill

    def _sync(self) -> None:
        """Resolve the in-flight step: its tokens reach the requests, stops are checked."""
        handle, self._inflight = self._inflight, None
        if handle is None:
            return
        if self.spec is not None:  # a fused speculative step
            self._resolve_spec(handle)
            return
        try:
            out = handle.wait()
        except Exception as e:
            self._fail(handle.batch, e)
            return
        self._deliver(handle, out)

    def _fail(self, batch, error: Exception) -> None:
        log.error("step failed: %s", traceback.format_exc())
        for req in batch.reqs:
            self.scheduler.finish(req, "abort", f"engine error: {type(error).__name__}: {error}")

    def _deliver(self, handle, out) -> None:
        batch = handle.batch
        tokens: list = [None] * len(batch.reqs)
        logprobs: list = [None] * len(batch.reqs)
        tops: list = [None] * len(batch.reqs)
        k = 0
        for i, s in enumerate(batch.sampling):
            if s:
                tokens[i], logprobs[i], tops[i] = out.tokens[k], out.logprobs[k], out.top_logprobs[k]
                k += 1
        if handle.experts:
            self._record_experts(batch, handle.starts, handle.experts)
        self._tokens_generated += k
        self.scheduler.resolve(batch, tokens, logprobs, tops, self._check_stop)

    def _record_experts(self, batch, starts: list[int], experts: list[torch.Tensor]) -> None:
        """Per computed position of requests that asked: expert ids [moe_layer][k]. A request's list covers
        positions 0 .. len(prompt) + len(output) - 2 (the last token is sampled, never computed)."""
        stacked = torch.stack(experts, dim=1).tolist()  # [T, L, k]
        offset = 0
        for req, start, n in zip(batch.reqs, starts, batch.num_new):
            if req.sampling.return_routed_experts:
                if start > len(req.routed_experts):  # a prefix from the cache: its routing is kept with its KV
                    req.routed_experts += self.runner.routed_experts(req.page_table, len(req.routed_experts), start)
                # a recompute (retraction) revisits positions already recorded: keep the first record
                for pos in range(max(start, len(req.routed_experts)), start + n):
                    req.routed_experts.append(stacked[offset + pos - start])
            offset += n

    def _idle_checks(self) -> None:
        now = time.monotonic()
        if self.scheduler.is_idle and now - self._last_integrity_check > 5.0:
            self._last_integrity_check = now
            try:
                self.check_integrity()
            except AssertionError:
                log.error("integrity check failed: %s", traceback.format_exc())

    def _expire_sessions(self) -> None:
        now = time.monotonic()
        if now - self._last_session_sweep < 1.0:
            return
        self._last_session_sweep = now
        timeout = self.config.session_timeout_s
        for s in list(self._sessions.values()):
            if not s.closed and not s.busy and now - s.last_used > timeout:
                s.close_on_loop("expired after idle timeout")
