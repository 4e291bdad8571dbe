"""/v1/chat/completions for base models, fine-tuned models and checkpoints; streaming as
server-sent events ending in `data: [DONE]`."""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from afinar.serve.engine import Engine
from afinar.serve.errors import ApiError
from afinar.serve.ids import new_id, now
from afinar.serve.routers.deps import Project, get_engine, get_project
from afinar.serve.schemas import ChatRequest

router = APIRouter(prefix="/v1/chat", tags=["chat"])
DEFAULT_MAX_TOKENS = 512


def _text(content) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type") != "text":
            raise ApiError(400, f"content parts of type '{part.get('type')}' are not supported "
                           "by this model; send text.", param="messages")
        parts.append(part.get("text", ""))
    return "".join(parts)


def _conversation(body: ChatRequest) -> list[dict]:
    messages = []
    for i, m in enumerate(body.messages):
        if m.role in ("tool", "function"):
            raise ApiError(400, f"messages[{i}]: role '{m.role}' is not supported yet.",
                           param=f"messages.[{i}].role")
        role = "system" if m.role == "developer" else m.role
        messages.append({"role": role, "content": _text(m.content)})
    return messages


def _settings(body: ChatRequest):
    from afinar.infer.generate import GenerationSettings

    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4:
        raise ApiError(400, "stop: at most 4 sequences.", param="stop")
    return GenerationSettings(
        max_new_tokens=body.max_completion_tokens or body.max_tokens or DEFAULT_MAX_TOKENS,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p, stop=tuple(s for s in stop if s),
        seed=body.seed)


def _usage(completion) -> dict:
    return {"prompt_tokens": completion.prompt_tokens,
            "completion_tokens": completion.completion_tokens,
            "total_tokens": completion.prompt_tokens + completion.completion_tokens}


@router.post("/completions")
async def completions(body: ChatRequest, engine: Engine = Depends(get_engine),
                      project: Project = Depends(get_project)):
    # An unknown model, or another project's, is a 404 before anything starts.
    await run_in_threadpool(engine.resolve, body.model, project.view)
    conversation = _conversation(body)
    settings = _settings(body)
    ident, created = new_id("chatcmpl-"), now()
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(engine, body.model, conversation, settings, ident,
                                         created, include_usage),
                                 media_type="text/event-stream")

    future = await run_in_threadpool(engine.submit, body.model, conversation, settings)
    completion = await asyncio.wrap_future(future)
    return {"id": ident, "object": "chat.completion", "created": created, "model": body.model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant",
                                                 "content": completion.text, "refusal": None},
                         "logprobs": None, "finish_reason": completion.finish_reason}],
            "usage": _usage(completion)}


def _stream(engine: Engine, model: str, conversation, settings, ident: str, created: int,
            include_usage: bool):
    """A sync generator (Starlette runs it in a thread): the engine's lock is held while
    the answer streams."""

    def chunk(delta: dict, finish: str | None = None, usage: dict | None = None,
              choices: bool = True) -> str:
        payload = {"id": ident, "object": "chat.completion.chunk", "created": created,
                   "model": model, "system_fingerprint": None,
                   "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                "finish_reason": finish}] if choices else []}
        if include_usage:
            payload["usage"] = usage
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    result: dict = {}
    try:
        with engine.use(model) as loaded:
            yield chunk({"role": "assistant", "content": ""})
            for piece in loaded.stream(conversation, settings, result=result):
                if piece:
                    yield chunk({"content": piece})
    except ApiError as exc:  # the status line is sent: the error is the stream's last event
        error = {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}
        yield f"data: {json.dumps({'error': error}, ensure_ascii=False)}\n\n"
        return
    completion = result.get("completion")
    yield chunk({}, completion.finish_reason if completion else "stop")
    if include_usage and completion is not None:
        yield chunk({}, usage=_usage(completion), choices=False)
    yield "data: [DONE]\n\n"
