"""An OpenAI-compatible HTTP API on the sessions: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``.

``stream: true`` answers with server-sent events (``data: {chunk}\\n\\n`` per piece of
text, then ``data: [DONE]``); ``stream: false`` with one JSON body. A client that
disconnects mid-stream cancels its request in the pipeline. Errors are OpenAI's
``{"error": {"message", "type", "param", "code"}}``: 400/404 for a bad request (the
field is named), 401 for a wrong key, 429 when the queue is full, 503 when the
pipeline is down. Every body is a model of :mod:`~smolcluster.serving.openai_schema`,
and ``/openapi.json`` publishes them (the streams' chunks too).

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:7860/v1", api_key="none")
    for chunk in client.chat.completions.create(model=MODEL, messages=[...], stream=True):
        print(chunk.choices[0].delta.content or "", end="")
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from loguru import logger
from pydantic.json_schema import models_json_schema

from smolcluster.serving.fair_queue import QueueFull
from smolcluster.serving.openai_requests import (
    APIError,
    ModelLimits,
    ParsedRequest,
    parse_chat,
    parse_completion,
)
from smolcluster.serving.openai_schema import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Delta,
    ErrorResponse,
    ModelCard,
    ModelList,
    Usage,
    dump,
    validation_error,
)
from smolcluster.serving.sessions import Generation, PipelineDown, Sessions

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
ERRORS = {status: {"model": ErrorResponse, "description": what} for status, what in (
    (400, "A bad request: `error.param` names the field"), (401, "A wrong or missing API key"),
    (404, "No such model"), (429, "Too many requests waiting: retry later"),
    (503, "The inference pipeline is down (rebuilding): retry in a few seconds"))}
# A stream's events, as OpenAPI 3.2 describes server-sent events: each `data:` is a chunk, then `[DONE]`.
STREAMS = {"/v1/completions": "Completion", "/v1/chat/completions": "ChatCompletionChunk"}


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def generation_error(gen: Generation) -> APIError:
    if isinstance(gen.error, PipelineDown):
        return APIError(503, str(gen.error), None, "pipeline_unavailable", "service_unavailable")
    return APIError(500, f"generation failed: {gen.error}", None, "generation_failed", "server_error")


class OpenAIAPI:
    def __init__(self, sessions: Sessions, model_name: str, *, chat_max_tokens: int = 128, created: int | None = None):
        self.sessions, self.model_name = sessions, model_name
        self.chat_max_tokens = chat_max_tokens
        self.created = created if created is not None else int(time.time())

    @property
    def limits(self) -> ModelLimits:
        return ModelLimits(self.model_name, self.sessions.context, self.sessions.vocab_size, tuple(self.sessions.adapters))

    def install(self, app: FastAPI) -> None:
        """Add the routes (before any catch-all mount such as the chat page's)."""
        app.add_exception_handler(APIError, lambda _req, e: error_response(e))
        app.add_exception_handler(RequestValidationError, self.invalid_request)
        app.add_exception_handler(Exception, self.internal_error)
        app.add_api_route("/v1/models", self.list_models, methods=["GET"], response_model=ModelList,
                          responses=ERRORS, summary="The model served here, and BASE:NAME for each LoRA adapter")
        app.add_api_route("/v1/models/{model_id:path}", self.get_model, methods=["GET"],
                          response_model=ModelCard, responses=ERRORS, summary="One model")
        app.add_api_route("/v1/completions", self.completions, methods=["POST"],
                          response_model=Completion, responses=ERRORS, summary="Continue a prompt")
        app.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"],
                          response_model=ChatCompletion, responses=ERRORS, summary="Answer a conversation")
        app.add_api_route("/v1/{rest:path}", self.not_found, include_in_schema=False,
                          methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"])
        app.openapi = with_streams(app, app.openapi)

    # -- routes ---------------------------------------------------------------------------------------
    def model_card(self, model_id: str) -> ModelCard:
        info = self.sessions.model_info
        return ModelCard(id=model_id, created=self.created, owned_by="smolcluster",
                         architecture=info["architecture"], context_length=info["context"],
                         vocab_size=info["vocab_size"], kernels=info.get("kernels", []),
                         decode=info.get("decode", []),
                         parent=self.model_name if model_id != self.model_name else None)

    async def list_models(self) -> JSONResponse:
        return JSONResponse(dump(ModelList(object="list", data=[self.model_card(m) for m in self.limits.ids])))

    async def get_model(self, model_id: str) -> JSONResponse:
        self.limits.adapter(model_id)  # 404 for an id not served here
        return JSONResponse(dump(self.model_card(model_id)))

    async def not_found(self, rest: str, request: Request) -> JSONResponse:
        known = {"models", "completions", "chat/completions"}
        if rest in known:
            raise APIError(405, f"{request.method} /v1/{rest} is not supported: use "
                           f"{'GET' if rest == 'models' else 'POST'}", None, "method_not_allowed")
        raise APIError(404, f"no such endpoint /v1/{rest}: this server has /v1/models, /v1/completions and "
                       "/v1/chat/completions", None, "unknown_url")

    async def completions(self, body: CompletionRequest, request: Request):
        parsed = parse_completion(body, self.limits, self.sessions.tokenizer)
        return await self.run(parsed, request)

    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        parsed = parse_chat(body, self.limits, self.sessions.chat_format, self.chat_max_tokens)
        return await self.run(parsed, request)

    @staticmethod
    def invalid_request(_request: Request, e: RequestValidationError) -> JSONResponse:
        """A body its model refused: OpenAI's 400, naming the (first) offending field."""
        param, message, code = validation_error(e.errors()[0])
        return error_response(APIError(400, message, param, code))

    @staticmethod
    def internal_error(request: Request, e: Exception) -> JSONResponse:
        """A bug: the client gets OpenAI's error shape, the log the traceback; the server keeps serving."""
        logger.opt(exception=e).error(f"{request.method} {request.url.path} failed")
        return error_response(APIError(500, f"internal error: {type(e).__name__}: {e}", None, "internal_error",
                                       "server_error"))

    # -- helpers ----------------------------------------------------------------------------------------
    async def run(self, parsed: ParsedRequest, request: Request):
        # The client's address, never the body's `user` field: a client naming itself anew for each request
        # would otherwise take a fair share per name (the key is one shared secret: it names no one).
        user = request.client.host if request.client else "anonymous"
        try:
            gen = self.sessions.submit(parsed.prompt_ids, user=f"api:{user}", settings=parsed.settings,
                                     loop=asyncio.get_running_loop())
        except PipelineDown as e:
            raise APIError(503, str(e), None, "pipeline_unavailable", "service_unavailable") from None
        except QueueFull as e:
            raise APIError(429, str(e), None, "queue_full", "rate_limit_error") from None
        rid = f"{'chatcmpl' if parsed.chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if parsed.stream:
            return StreamingResponse(self.events(gen, parsed, rid), media_type="text/event-stream",
                                     headers=SSE_HEADERS)
        try:
            async for _ in gen.astream():
                pass
        finally:
            gen.cancel()  # the client went away (the handler was cancelled): free the pipeline's caches
        if gen.error is not None:
            raise generation_error(gen)
        head = {"id": rid, "created": int(time.time()), "model": parsed.model, "usage": self.usage(parsed, gen)}
        if parsed.chat:
            body = ChatCompletion(**head, choices=[ChatChoice(index=0, message=AssistantMessage(content=gen.text),
                                                              finish_reason=gen.finish_reason)])
        else:
            text = (parsed.prompt_text if parsed.echo else "") + gen.text
            body = Completion(**head, choices=[CompletionChoice(index=0, text=text, logprobs=None,
                                                                finish_reason=gen.finish_reason)])
        return JSONResponse(dump(body))

    @staticmethod
    def usage(parsed: ParsedRequest, gen: Generation) -> Usage:
        n_prompt = len(parsed.prompt_ids)
        return Usage(prompt_tokens=n_prompt, completion_tokens=gen.completion_tokens,
                     total_tokens=n_prompt + gen.completion_tokens)

    async def events(self, gen: Generation, parsed: ParsedRequest, rid: str) -> AsyncIterator[str]:
        head = {"id": rid, "created": int(time.time()), "model": parsed.model}
        Chunk = ChatCompletionChunk if parsed.chat else Completion  # noqa: N806 (a class)

        def chunk(piece: str | None, finish_reason: str | None = None, first: bool = False) -> str:
            if parsed.chat:
                delta = Delta(role="assistant", content="") if first else Delta()
                if piece is not None:
                    delta.content = piece
                choice = ChatChunkChoice(index=0, delta=delta, logprobs=None, finish_reason=finish_reason)
            else:
                choice = CompletionChoice(index=0, text=piece or "", logprobs=None, finish_reason=finish_reason)
            body = dump(Chunk(**head, choices=[choice]), exclude=None if parsed.include_usage else {"usage"})
            return f"data: {json.dumps(body)}\n\n"

        try:
            if parsed.chat:
                yield chunk(None, first=True)
            elif parsed.echo:
                yield chunk(parsed.prompt_text)
            async for piece in gen.astream():
                yield chunk(piece)
            if gen.error is not None:
                logger.warning(f"{rid}: {gen.error}")
                yield f"data: {json.dumps(generation_error(gen).body())}\n\n"
            else:
                yield chunk(None, gen.finish_reason)
                if parsed.include_usage:
                    usage = Chunk(**head, choices=[], usage=self.usage(parsed, gen))
                    yield f"data: {json.dumps(dump(usage))}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            gen.cancel()  # a client that hung up mid-stream: the pipeline frees the request's caches


def with_streams(app: FastAPI, openapi):
    """``app.openapi`` with the streams described: FastAPI documents the JSON answers; a ``stream: true``
    request answers ``text/event-stream`` whose every ``data:`` is a chunk model (then ``[DONE]``)."""

    def schema() -> dict:
        if app.openapi_schema is None:
            doc = openapi()
            _, defs = models_json_schema([(ChatCompletionChunk, "serialization"), (Completion, "serialization")],
                                         ref_template="#/components/schemas/{model}")
            for name, s in defs["$defs"].items():
                doc["components"]["schemas"].setdefault(name, s)
            for name in ("HTTPValidationError", "ValidationError"):  # FastAPI's 422: answered as 400 here
                doc["components"]["schemas"].pop(name, None)
            for op in (op for ops in doc["paths"].values() for op in ops.values()):
                op["responses"].pop("422", None)
            for path, chunk in STREAMS.items():
                content = doc["paths"][path]["post"]["responses"]["200"]["content"]
                content["text/event-stream"] = {
                    "schema": {"type": "string", "description": f"`data: {{{chunk}}}` events, then `data: [DONE]`"},
                    "itemSchema": {"type": "object", "required": ["data"], "properties": {"data": {
                        "type": "string", "contentMediaType": "application/json",
                        "contentSchema": {"$ref": f"#/components/schemas/{chunk}"}}}}}
        return app.openapi_schema

    return schema
