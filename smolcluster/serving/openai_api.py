"""An OpenAI-compatible HTTP API on the engine: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``.

``stream: true`` answers with server-sent events (``data: {chunk}\\n\\n`` per piece of
text, then ``data: [DONE]``); ``stream: false`` with one JSON body. A client that
disconnects mid-stream cancels its request in the pipeline. Errors are OpenAI's
``{"error": {"message", "type", "param", "code"}}``: 400/404 for a bad request (the
field is named), 401 for a wrong key, 429 when the queue is full, 503 when the
pipeline is down.

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
from fastapi.responses import JSONResponse, StreamingResponse
from loguru import logger

from smolcluster.serving.engine import Engine, Generation, PipelineDown
from smolcluster.serving.fair_queue import QueueFull
from smolcluster.serving.openai_requests import (
    APIError,
    ModelLimits,
    ParsedRequest,
    bad,
    parse_chat,
    parse_completion,
)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def generation_error(gen: Generation) -> APIError:
    if isinstance(gen.error, PipelineDown):
        return APIError(503, str(gen.error), None, "pipeline_unavailable", "service_unavailable")
    return APIError(500, f"generation failed: {gen.error}", None, "generation_failed", "server_error")


class OpenAIAPI:
    def __init__(self, engine: Engine, model_name: str, *, chat_max_tokens: int = 128, api_key: str | None = None,
                 created: int | None = None):
        self.engine, self.model_name = engine, model_name
        self.chat_max_tokens, self.api_key = chat_max_tokens, api_key
        self.created = created if created is not None else int(time.time())

    @property
    def limits(self) -> ModelLimits:
        return ModelLimits(self.model_name, self.engine.context, self.engine.vocab_size)

    def install(self, app: FastAPI) -> None:
        """Add the routes (before any catch-all mount such as the chat page's)."""
        app.add_exception_handler(APIError, lambda _req, e: error_response(e))
        app.add_exception_handler(Exception, self.internal_error)
        app.add_api_route("/v1/models", self.list_models, methods=["GET"])
        app.add_api_route("/v1/models/{model_id:path}", self.get_model, methods=["GET"])
        app.add_api_route("/v1/completions", self.completions, methods=["POST"])
        app.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"])
        app.add_api_route("/v1/{rest:path}", self.not_found,
                          methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"])

    # -- routes ---------------------------------------------------------------------------------------
    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "smolcluster",
                "context_length": self.engine.context}

    async def list_models(self, request: Request) -> JSONResponse:
        self.authorize(request)
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    async def get_model(self, model_id: str, request: Request) -> JSONResponse:
        self.authorize(request)
        if model_id != self.model_name:
            raise APIError(404, f"The model '{model_id}' does not exist: this server serves '{self.model_name}'",
                           "model", "model_not_found")
        return JSONResponse(self.model_card())

    async def not_found(self, rest: str, request: Request) -> JSONResponse:
        known = {"models", "completions", "chat/completions"}
        if rest in known:
            raise APIError(405, f"{request.method} /v1/{rest} is not supported: use "
                           f"{'GET' if rest == 'models' else 'POST'}", None, "method_not_allowed")
        raise APIError(404, f"no such endpoint /v1/{rest}: this server has /v1/models, /v1/completions and "
                       "/v1/chat/completions", None, "unknown_url")

    async def completions(self, request: Request):
        self.authorize(request)
        parsed = parse_completion(await self.body(request), self.limits, self.engine.tokenizer)
        return await self.run(parsed, request)

    async def chat_completions(self, request: Request):
        self.authorize(request)
        parsed = parse_chat(await self.body(request), self.limits, self.engine.tokenizer, self.chat_max_tokens)
        return await self.run(parsed, request)

    @staticmethod
    def internal_error(request: Request, e: Exception) -> JSONResponse:
        """A bug: the client gets OpenAI's error shape, the log the traceback; the server keeps serving."""
        logger.opt(exception=e).error(f"{request.method} {request.url.path} failed")
        return error_response(APIError(500, f"internal error: {type(e).__name__}: {e}", None, "internal_error",
                                       "server_error"))

    # -- helpers ----------------------------------------------------------------------------------------
    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        if request.headers.get("authorization", "") != f"Bearer {self.api_key}":
            raise APIError(401, "Incorrect API key provided: send 'Authorization: Bearer <serve.api_key>'",
                           None, "invalid_api_key")

    @staticmethod
    async def body(request: Request):
        raw = await request.body()
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise bad(None, f"the request body is not valid JSON: {e}", "invalid_json") from None

    async def run(self, parsed: ParsedRequest, request: Request):
        user = parsed.user or (request.client.host if request.client else "anonymous")
        try:
            gen = self.engine.submit(parsed.prompt_ids, user=f"api:{user}", settings=parsed.settings,
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
        text = (parsed.prompt_text if parsed.echo else "") + gen.text
        choice: dict = {"index": 0, "finish_reason": gen.finish_reason}
        if parsed.chat:
            choice["message"] = {"role": "assistant", "content": gen.text}
        else:
            choice.update(text=text, logprobs=None)
        return JSONResponse({"id": rid, "object": "chat.completion" if parsed.chat else "text_completion",
                             "created": int(time.time()), "model": parsed.model, "choices": [choice],
                             "usage": self.usage(parsed, gen)})

    @staticmethod
    def usage(parsed: ParsedRequest, gen: Generation) -> dict:
        n_prompt = len(parsed.prompt_ids)
        return {"prompt_tokens": n_prompt, "completion_tokens": gen.completion_tokens,
                "total_tokens": n_prompt + gen.completion_tokens}

    async def events(self, gen: Generation, parsed: ParsedRequest, rid: str) -> AsyncIterator[str]:
        created = int(time.time())
        obj = "chat.completion.chunk" if parsed.chat else "text_completion"

        def chunk(piece: str | None, finish_reason: str | None = None, first: bool = False) -> str:
            if parsed.chat:
                delta: dict = {"role": "assistant", "content": ""} if first else {}
                if piece is not None:
                    delta["content"] = piece
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            else:
                choice = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish_reason}
            body: dict = {"id": rid, "object": obj, "created": created, "model": parsed.model, "choices": [choice]}
            if parsed.include_usage:
                body["usage"] = None
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
                    usage = {"id": rid, "object": obj, "created": created, "model": parsed.model, "choices": [],
                             "usage": self.usage(parsed, gen)}
                    yield f"data: {json.dumps(usage)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            gen.cancel()  # a client that hung up mid-stream: the pipeline frees the request's caches
