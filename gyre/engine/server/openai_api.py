"""OpenAI-compatible /v1/chat/completions, /v1/completions and the native /generate (token ids in,
token ids, logprobs and weight versions out)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request

from gyre.engine.request import Completion, SamplingParams
from gyre.engine.server.common import ApiError, ServerState, error_body, get_state
from gyre.engine.server.generation import Generation, SSEResponse, TokenEvent, unless_disconnected
from gyre.engine.server.protocol import ChatCompletionRequest, CompletionRequest, GenerateRequest, _Sampling
from gyre.engine.server.replies import ChatReply, CompletionReply, native, sse

if TYPE_CHECKING:
    from gyre.engine.engine import Engine

router = APIRouter()


# -- prompts and sampling ---------------------------------------------------------------------------
def encode(engine: Engine, text: str) -> list[int]:
    if engine.tokenizer is None:
        raise ApiError(400, "the model directory has no tokenizer: send token ids to /generate")
    try:
        return engine.tokens.encode(text)
    except Exception as e:  # noqa: BLE001 - e.g. lone surrogates the tokenizer cannot take
        raise ApiError(400, f"cannot tokenize the text: {e}") from None


def render_chat(
    engine: Engine, messages: list[dict], tools: list | None, add_generation_prompt: bool = True
) -> str:
    try:
        return engine.tokens.render_chat(messages, add_generation_prompt, tools)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - jinja errors on messages the template does not accept
        raise ApiError(
            400, f"the chat template cannot render these messages: {type(e).__name__}: {e}"
        ) from None


def room(engine: Engine) -> int:
    """Most tokens (prompt + output) one sequence can have."""
    return min(engine.max_model_len, engine.runner.pool.capacity_tokens)


def sampling_params(
    body: _Sampling,
    max_new_tokens: int | None,
    prompt_len: int,
    top_logprobs: int,
    engine: Engine,
    json_schema: dict | None = None,
) -> SamplingParams:
    if max_new_tokens is None:  # OpenAI: up to the context length
        max_new_tokens = max(1, room(engine) - prompt_len)
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        stop=body.stop,
        stop_token_ids=body.stop_token_ids,
        ignore_eos=body.ignore_eos,
        n=body.n,
        seed=body.seed,
        top_logprobs=top_logprobs,
        json_schema=json_schema,
    )


# -- running ----------------------------------------------------------------------------------------
async def reply(
    request: Request,
    gen: Generation,
    fmt: ChatReply | CompletionReply,
    stream: bool,
    include_usage: bool,
    on_close: Callable[[], None],
) -> Any:
    """The whole reply (aborted if the client goes first), or an SSE stream of chunks."""

    def cleanup() -> None:  # idempotent
        gen.abort()  # whatever still runs: the client is gone, or an error ended the reply
        on_close()

    if not stream:
        try:
            return fmt.response(await unless_disconnected(request, gen, gen.wait()))
        finally:
            cleanup()
    try:
        await unless_disconnected(request, gen, gen.first())  # an error before the first token: plain reply
    except BaseException:
        cleanup()
        raise
    return SSEResponse(_events(gen, fmt, include_usage), cleanup)


async def _events(
    gen: Generation, fmt: ChatReply | CompletionReply, include_usage: bool
) -> AsyncIterator[bytes]:
    streams = fmt.text_streams()
    done: dict[int, Completion] = {}
    for chunk in fmt.opening():
        yield sse(chunk)
    async for ev in gen.events():
        if isinstance(ev, TokenEvent):
            chunk = fmt.token_chunk(ev, streams[ev.index].push(ev.token_id))
            if chunk is not None:
                yield sse(chunk)
        elif ev.error is not None:
            status = ev.error.status if isinstance(ev.error, ApiError) else 500
            yield sse(error_body(status, str(ev.error) or type(ev.error).__name__))
            return
        else:
            done[ev.index] = ev.completion
            yield sse(fmt.final_chunk(ev.index, ev.completion, streams[ev.index]))
    if include_usage:
        yield sse(fmt.usage_chunk([done[j] for j in sorted(done)]))
    yield b"data: [DONE]\n\n"


def track(st: ServerState, reply_id: str, gen: Generation) -> Callable[[], None]:
    """Make the reply abortable by its id (/admin/abort); returns the cleanup."""
    st.live[reply_id] = gen
    return lambda: st.live.pop(reply_id, None)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    st = get_state(request)
    engine = st.require_engine()
    st.check_model(body.model)
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    prompt_ids = encode(engine, render_chat(engine, [m.to_template() for m in body.messages], tools))
    top = (body.top_logprobs or 0) if body.logprobs else 0
    sp = sampling_params(
        body, body.max_completion_tokens or body.max_tokens, len(prompt_ids), top, engine, body.json_schema()
    )
    reqs = engine.make_requests([prompt_ids], sp)
    fmt = ChatReply(engine, body.model, body, prompt_ids)
    gen = Generation.submit(engine, reqs, body.stream)
    usage = bool(body.stream_options and body.stream_options.include_usage)
    return await reply(request, gen, fmt, body.stream, usage, track(st, fmt.id, gen))


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Any:
    st = get_state(request)
    engine = st.require_engine()
    st.check_model(body.model)
    if body.echo and body.logprobs is not None:
        raise ApiError(400, "echo with logprobs is not supported (no prompt logprobs yet)", param="echo")
    p = body.prompt
    if isinstance(p, str):
        prompts = [encode(engine, p)]
    elif not p:
        raise ApiError(400, "prompt is empty", param="prompt")
    elif isinstance(p[0], str):
        prompts = [encode(engine, s) for s in p]
    elif isinstance(p[0], int):
        prompts = [list(p)]
    else:
        prompts = [list(x) for x in p]
    sp = sampling_params(body, body.max_tokens, max(len(x) for x in prompts), body.logprobs or 0, engine)
    reqs = engine.make_requests(prompts, sp)
    fmt = CompletionReply(engine, body.model, body, prompts)
    gen = Generation.submit(engine, reqs, body.stream)
    usage = bool(body.stream_options and body.stream_options.include_usage)
    return await reply(request, gen, fmt, body.stream, usage, track(st, fmt.id, gen))


@router.post("/generate")
async def generate(body: GenerateRequest, request: Request) -> dict[str, Any]:
    """Token ids in; token ids, logprobs, and the weight version of every generated token out."""
    engine = get_state(request).require_engine()
    ids = body.input_ids
    prompts = [list(x) for x in ids] if isinstance(ids[0], list) else [list(ids)]
    sp = SamplingParams(**body.sampling_params.model_dump())
    gen = Generation.submit(engine, engine.make_requests(prompts, sp), stream=False)
    outs = await unless_disconnected(request, gen, gen.wait())
    return {
        "weight_version": engine.weight_version,
        "completions": [native(c, i // sp.n, i % sp.n) for i, c in enumerate(outs)],
    }
