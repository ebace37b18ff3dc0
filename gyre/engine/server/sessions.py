"""Session endpoints: multi-turn conversations whose KV stays cached and whose trajectory is exactly the
tokens appended and generated (nothing re-tokenised). For tool-using environments:

    POST   /v1/sessions                        -> {"id"}
    POST   /v1/sessions/{id}/chat/completions  OpenAI chat body; one reply per turn (n = 1)
    POST   /v1/sessions/{id}/append            {"token_ids" | "messages", "trainable"}: environment tokens
    GET    /v1/sessions/{id}/trajectory        token_ids, logprobs, loss_mask, weight_versions, turns
    DELETE /v1/sessions/{id}

A chat body may carry the whole conversation (as OpenAI clients send it) or only the new messages: when
its first messages are those the session already holds (roles, and the text of all but the assistant's
replies), only the rest is appended. An OpenAI client pointed at base_url=.../v1/sessions/{id} works as is.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import jinja2
from fastapi import APIRouter, Request

from gyre.engine.server.common import ApiError, ServerState, get_state
from gyre.engine.server.generation import Generation
from gyre.engine.server.openai_api import encode, render_chat, reply, room, sampling_params, track
from gyre.engine.server.protocol import AppendRequest, ChatCompletionRequest, ChatMessage
from gyre.engine.server.replies import ChatReply

if TYPE_CHECKING:
    from gyre.engine.request import Completion
    from gyre.engine.session import Session

router = APIRouter()


class SessionView:
    """A session as its OpenAI client sees it: (role, text) of the messages so far, replies included."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.messages: list[tuple[str, str | None]] = []
        self.gen: Generation | None = None  # the turn in flight

    def new_messages(self, msgs: list[ChatMessage]) -> list[ChatMessage]:
        k = len(self.messages)
        if k and len(msgs) >= k and all(_key(m) == held for m, held in zip(msgs, self.messages)):
            return msgs[k:]
        return msgs

    def add(self, msgs: list[ChatMessage]) -> None:
        self.messages.extend(_key(m) for m in msgs)


def _key(m: ChatMessage) -> tuple[str, str | None]:
    role = "system" if m.role == "developer" else m.role
    return role, None if role == "assistant" else m.text


def _view(st: ServerState, session_id: str) -> SessionView:
    engine = st.require_engine()
    try:
        session = engine.get_session(session_id)
    except KeyError:
        st.sessions.pop(session_id, None)
        raise ApiError(404, f"unknown or closed session {session_id!r}", code="session_not_found") from None
    view = st.sessions.get(session_id)
    if view is None or view.session is not session:
        view = st.sessions[session_id] = SessionView(session)
    return view


def _input_error(e: Exception) -> ApiError:
    return ApiError(400, f"the chat template cannot render these messages: {type(e).__name__}: {e}")


@router.post("/v1/sessions")
async def open_session(request: Request) -> dict[str, Any]:
    st = get_state(request)
    engine = st.require_engine()
    for sid in [sid for sid, v in st.sessions.items() if v.session.closed]:  # expired ones
        del st.sessions[sid]
    session = engine.open_session()
    st.sessions[session.session_id] = SessionView(session)
    return {"id": session.session_id, "object": "session"}


@router.post("/v1/sessions/{session_id}/chat/completions")
async def session_chat(session_id: str, body: ChatCompletionRequest, request: Request) -> Any:
    st = get_state(request)
    view = _view(st, session_id)
    engine = st.require_engine()
    st.check_model(body.model)
    if body.n != 1:
        raise ApiError(400, "a session generates one reply per turn: n must be 1", param="n")
    if view.gen is not None or view.session.busy:
        raise ApiError(409, f"session {session_id} is generating; wait for the turn to end")
    msgs = view.new_messages(body.messages)
    new: list[Any] = [m.to_template() for m in msgs]
    if not new and view.messages and view.messages[-1][0] != "assistant":
        new = encode(engine, _generation_prompt(engine))  # messages were appended: open the reply
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    held = len(view.session.token_ids)
    max_new = body.max_completion_tokens or body.max_tokens
    if max_new is None:  # up to the context length, less an estimate of what this turn appends
        estimate = len(new)
        if msgs:
            estimate = len(encode(engine, render_chat(engine, new, tools if held == 0 else None)))
        max_new = max(1, room(engine) - held - estimate - 16)
    top = (body.top_logprobs or 0) if body.logprobs else 0
    sp = sampling_params(body, max_new, 0, top, engine, body.json_schema())

    fmt = ChatReply(engine, body.model, body, [])
    fmt.extra = lambda c: _turn_fields(session_id, c, held, body.return_token_ids)
    gen = Generation()
    on_token = gen.token_callback(0) if body.stream else None
    task = asyncio.ensure_future(_turn(view.session, new, sp, tools, on_token))

    def recorded(t: asyncio.Task) -> None:  # a cancelled turn is recorded too (its partial output)
        if t.cancelled() or t.exception() is None:
            view.add(msgs)
            view.messages.append(("assistant", None))

    task.add_done_callback(recorded)
    gen.track(0, task, view.session.abort)  # an aborted turn still ends normally, and is recorded
    view.gen = gen
    untrack = track(st, fmt.id, gen)

    def close() -> None:
        view.gen = None
        untrack()

    usage = bool(body.stream_options and body.stream_options.include_usage)
    return await reply(request, gen, fmt, body.stream, usage, close)


def _generation_prompt(engine: Any) -> str:
    """What the chat template adds to open an assistant reply (e.g. "<|im_start|>assistant\\n")."""
    probe = [{"role": "user", "content": "x"}]
    full, bare = render_chat(engine, probe, None, True), render_chat(engine, probe, None, False)
    return full[len(bare) :] if full.startswith(bare) else ""


async def _turn(session: Session, new: list, sp: Any, tools: list | None, on_token: Any) -> Completion:
    try:
        return await session.agenerate(new or None, sp, tools, on_token=on_token)
    except (jinja2.TemplateError, TypeError) as e:
        raise _input_error(e) from None
    except RuntimeError as e:  # the session is generating (a turn from another client)
        raise ApiError(409, str(e)) from None


def _turn_fields(session_id: str, c: Completion, held: int, token_ids: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"session_id": session_id, "weight_version": c.weight_version}
    if token_ids:
        out["appended_token_ids"] = c.prompt_ids[held:]  # what this turn's messages added before generating
    return out


@router.post("/v1/sessions/{session_id}/append")
async def append(session_id: str, body: AppendRequest, request: Request) -> dict[str, Any]:
    view = _view(get_state(request), session_id)
    if view.gen is not None:
        raise ApiError(409, f"session {session_id} is generating; append after the turn ends")
    new: Any = [m.to_template() for m in body.messages] if body.messages is not None else body.token_ids
    try:
        ids = view.session.append(new, trainable=body.trainable)
    except (jinja2.TemplateError, TypeError) as e:
        raise _input_error(e) from None
    except RuntimeError as e:
        raise ApiError(409, str(e)) from None
    if body.messages is not None:
        view.add(body.messages)
    return {"id": session_id, "token_ids": ids, "num_tokens": len(view.session.token_ids)}


@router.get("/v1/sessions/{session_id}/trajectory")
async def trajectory(session_id: str, request: Request) -> dict[str, Any]:
    view = _view(get_state(request), session_id)
    t = view.session.trajectory()
    return {
        "id": session_id,
        "token_ids": t.token_ids,
        "logprobs": t.logprobs,
        "loss_mask": t.loss_mask,
        "weight_versions": t.weight_versions,
        "turns": [{"start": a, "end": b, "kind": kind} for a, b, kind in t.turns],
    }


@router.delete("/v1/sessions/{session_id}")
async def close_session(session_id: str, request: Request) -> dict[str, Any]:
    st = get_state(request)
    view = _view(st, session_id)
    if view.gen is not None:
        view.gen.abort()
    await asyncio.to_thread(view.session.close)
    st.sessions.pop(session_id, None)
    return {"id": session_id, "object": "session.deleted", "deleted": True}
