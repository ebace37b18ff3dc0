"""The engine requests behind one HTTP request: token events for streaming, incremental text that is
never taken back, and an abort when the client goes away."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
from fastapi import Request
from starlette.responses import StreamingResponse

from gyre.engine.request import Completion
from gyre.engine.server.common import ApiError
from gyre.engine.tool_calls import partial_suffix, streamable_prefix

if TYPE_CHECKING:
    from gyre.engine.engine import Engine
    from gyre.engine.request import Request as EngineRequest
    from gyre.engine.tokens import TokenizerHelper


@dataclass
class TokenEvent:
    index: int  # choice
    token_id: int
    logprob: float
    top: dict[int, float] | None


@dataclass
class DoneEvent:
    index: int
    completion: Completion | None
    error: BaseException | None = None


class Generation:
    """Choices 0..n-1 in flight. Token events are pushed from the engine thread; Done events when each
    choice's future resolves. abort() ends whatever is unfinished (idempotent)."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[TokenEvent | DoneEvent] = asyncio.Queue()
        self._pending: set[int] = set()
        self._aborts: dict[int, Callable[[], None]] = {}
        self._results: dict[int, Completion] = {}
        self._peeked: list[TokenEvent | DoneEvent] = []

    @classmethod
    def submit(cls, engine: Engine, reqs: list[EngineRequest], stream: bool) -> Generation:
        gen = cls()
        for j, req in enumerate(reqs):
            try:
                fut = asyncio.wrap_future(engine._submit(req, gen.token_callback(j) if stream else None))
            except RuntimeError as e:  # the engine is shut down
                gen.abort()
                raise ApiError(503, str(e)) from None
            gen.track(j, fut, functools.partial(engine.abort, req.request_id))
        return gen

    def token_callback(self, index: int) -> Callable[[EngineRequest], None]:
        def on_token(req: EngineRequest) -> None:  # engine thread: must never raise
            try:
                top = req.top_logprobs[-1] if req.sampling.top_logprobs else None
                ev = TokenEvent(index, req.output_ids[-1], req.output_logprobs[-1], top)
                self.loop.call_soon_threadsafe(self.queue.put_nowait, ev)
            except Exception:  # noqa: BLE001 - the event loop is gone with its client
                pass

        return on_token

    def track(self, index: int, fut: asyncio.Future, abort: Callable[[], None]) -> None:
        self._pending.add(index)
        self._aborts[index] = abort

        def done(f: asyncio.Future) -> None:
            if f.cancelled():
                self.queue.put_nowait(DoneEvent(index, None, asyncio.CancelledError()))
            elif f.exception() is not None:
                self.queue.put_nowait(DoneEvent(index, None, f.exception()))
            else:
                self.queue.put_nowait(DoneEvent(index, f.result()))

        fut.add_done_callback(done)

    def abort(self) -> None:
        for index in list(self._pending):
            self._aborts[index]()

    async def _next(self) -> TokenEvent | DoneEvent:
        ev = self._peeked.pop(0) if self._peeked else await self.queue.get()
        if isinstance(ev, DoneEvent):
            self._pending.discard(ev.index)
            if ev.completion is not None:
                self._results[ev.index] = ev.completion
        return ev

    async def first(self) -> None:
        """Wait for the first event, raising the error if it is one (before a stream sends its 200)."""
        ev = await self._next()
        if isinstance(ev, DoneEvent) and ev.error is not None:
            raise ev.error
        self._peeked.append(ev)

    async def events(self) -> AsyncIterator[TokenEvent | DoneEvent]:
        while self._pending or self._peeked:
            yield await self._next()

    async def wait(self) -> list[Completion]:
        async for ev in self.events():
            if isinstance(ev, DoneEvent) and ev.error is not None:
                self.abort()
                raise ev.error
        return [self._results[j] for j in sorted(self._results)]


async def unless_disconnected(request: Request, gen: Generation, work: Awaitable[Any]) -> Any:
    """Await `work` (gen.wait(), gen.first()); if the client disconnects first, abort the generation."""
    waiter = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({waiter, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if waiter.done():
            return waiter.result()
        raise ApiError(499, "the client disconnected")
    finally:
        watcher.cancel()
        if not waiter.done():
            waiter.cancel()
            gen.abort()


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class SSEResponse(StreamingResponse):
    """Server-sent events that stop (closing the body iterator, whose cleanup aborts the requests) as
    soon as the client disconnects, whatever ASGI version the server speaks."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], cleanup: Callable[[], None]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.cleanup = cleanup  # idempotent; runs however the stream ends, even if it never started

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:
                        pass  # the client is gone
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            self.cleanup()
            await self.body_iterator.aclose()


class TextStream:
    """Incremental detokenisation of one choice. Deltas are never taken back: a trailing piece that may
    still become a stop string (or, with tools, a `<tool_call>` marker) is held back until it cannot."""

    def __init__(
        self, tokens: TokenizerHelper, stop: list[str] | None, tool_calls: bool, hold_all: bool = False
    ) -> None:
        self.tokens = tokens
        self.stop = stop or []
        self.tool_calls = tool_calls
        self.hold_all = hold_all  # nothing is content (a forced tool call): all of it comes at the end
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of text sent
        self._prefix = 0  # decode window: ids[_prefix:_read] produced the last text piece
        self._read = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.tokens.decode(self.ids[self._prefix : self._read])
        after = self.tokens.decode(self.ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):  # no half-decoded character
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)
        end = 0 if self.hold_all else len(self.text)
        if self.tool_calls:
            end = min(end, streamable_prefix(self.text))
        for s in self.stop:
            found = self.text.find(s)
            end = min(end, found if found >= 0 else len(self.text) - partial_suffix(self.text, s))
        if end <= self.sent:
            return ""
        delta, self.sent = self.text[self.sent : end], end
        return delta

    def finish(self, final: str) -> str:
        """The rest of `final` (the whole content) after what was sent; nothing if they disagree."""
        sent = self.text[: self.sent]
        return final[len(sent) :] if final.startswith(sent) else ""


_BYTE_OF_CHAR: dict[str, int] = {}


def _gpt2_byte_map() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's bytes_to_unicode), inverted: char -> byte."""
    if not _BYTE_OF_CHAR:
        bs = (
            list(range(ord("!"), ord("~") + 1))
            + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), 256))
        )
        cs = list(bs)
        n = 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        _BYTE_OF_CHAR.update({chr(c): b for b, c in zip(bs, cs)})
    return _BYTE_OF_CHAR


class TokenText:
    """A token's text and exact bytes, for logprobs (OpenAI's `token` and `bytes`)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self.byte_level = type(decoder).__name__ == "ByteLevel"
        self.text = functools.lru_cache(maxsize=1 << 16)(self._text)
        self.bytes = functools.lru_cache(maxsize=1 << 16)(self._bytes)

    def _text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _bytes(self, token_id: int) -> list[int]:
        if self.byte_level:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            table = _gpt2_byte_map()
            if isinstance(piece, str) and piece and all(c in table for c in piece):
                return [table[c] for c in piece]
        return list(self.text(token_id).encode("utf-8", errors="replace"))
