"""Validated OpenAI requests -> what the sessions run, with errors OpenAI clients understand.

The bodies' shapes and types are checked by their models (:mod:`~smolcluster.serving.openai_schema`);
what needs the model is checked here: the model's name, token ids within its vocabulary,
a prompt that fits its context. Every error names the offending field in ``error.param``
(``"messages[1].content"``) and says what would be valid.
"""

from __future__ import annotations

from dataclasses import dataclass

from smolcluster.inference.adapters import adapter_of, model_ids
from smolcluster.inference.sampling import SamplingParams
from smolcluster.serving.openai_schema import (
    ChatCompletionRequest,
    CompletionRequest,
    SamplingRequest,
)
from smolcluster.serving.prompting import ChatFormat, PromptTooLong, build_chat_prompt
from smolcluster.serving.sessions import Settings


class APIError(Exception):
    """An HTTP error with OpenAI's body: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str | None, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param, code)


@dataclass(frozen=True)
class ParsedRequest:
    chat: bool
    model: str
    prompt_ids: list[int]
    prompt_text: str          # the prompt as text (echo; logs)
    settings: Settings
    stream: bool
    include_usage: bool
    echo: bool
    user: str | None


@dataclass(frozen=True)
class ModelLimits:
    name: str
    context: int
    vocab_size: int
    adapters: tuple[str, ...] = ()  # LoRA adapters served: model ids NAME:ADAPTER

    @property
    def ids(self) -> list[str]:
        """The model ids requests may name: the base model's, then each adapter's ``BASE:NAME``."""
        return model_ids(self.name, self.adapters)

    def adapter(self, model: str) -> str:
        """The adapter a model id names ("" for the base model); 404 for any other id."""
        adapter = adapter_of(model, self.name, self.adapters)
        if adapter is None:
            served = ", ".join(f"'{m}'" for m in self.ids)
            raise APIError(404, f"The model '{model}' does not exist: this server serves {served}", "model",
                           "model_not_found")
        return adapter


def sampling(req: SamplingRequest, max_tokens: int | None, default_max_tokens: int) -> dict:
    """The sessions' settings for a request's length and sampling (OpenAI's defaults where it gives none)."""
    return {"max_new_tokens": max_tokens if max_tokens is not None else default_max_tokens,
            "sampling": SamplingParams.from_openai(req.temperature, req.top_p, req.top_k, req.seed)}


def stops(req: SamplingRequest) -> tuple[str, ...]:
    stop = [req.stop] if isinstance(req.stop, str) else req.stop or []
    return tuple(s for s in stop if s)


def _check_fits(n: int, limits: ModelLimits, param: str) -> None:
    if n > limits.context:
        raise APIError(400, f"This model's maximum context length is {limits.context} tokens, but the "
                       f"{param} is {n} tokens: shorten it", param, "context_length_exceeded")


def _check_room(n: int, asked: int | None, limits: ModelLimits, param: str) -> None:
    """A ``max_tokens`` the client set that cannot fit after its prompt is refused (OpenAI's 400), not quietly
    cut; the server's default is only a ceiling (generation also ends at the context)."""
    if asked is not None and n + asked > limits.context:
        raise APIError(400, f"This model's maximum context length is {limits.context} tokens. However, you "
                       f"requested {n + asked} tokens ({n} in the prompt, {asked} in the completion): lower "
                       f"{param} to at most {limits.context - n}", param, "context_length_exceeded")


def _parsed(chat: bool, req: SamplingRequest, model: str, ids: list[int], text: str, settings: Settings,
            echo: bool = False) -> ParsedRequest:
    stream = bool(req.stream)
    include_usage = stream and req.stream_options is not None and req.stream_options.include_usage
    return ParsedRequest(chat, model, ids, text, settings, stream, include_usage, echo, req.user)


# -- the two endpoints --------------------------------------------------------------------------------------
def parse_completion(req: CompletionRequest, limits: ModelLimits, tokenizer,
                     default_max_tokens: int = 16) -> ParsedRequest:
    model, adapter = req.model, limits.adapter(req.model)
    if isinstance(req.prompt, str):
        ids, text = tokenizer.encode(req.prompt), req.prompt
        if not ids:
            raise bad("prompt", "the prompt encodes to no tokens: give some text to continue", "empty_prompt")
    else:
        bad_ids = [t for t in req.prompt if t >= limits.vocab_size]
        if bad_ids:
            raise bad("prompt", f"'prompt' token ids must be in [0, {limits.vocab_size}): got {bad_ids[:5]}")
        ids, text = list(req.prompt), tokenizer.decode(req.prompt)
    _check_fits(len(ids), limits, "prompt")
    _check_room(len(ids), req.max_tokens, limits, "max_tokens")
    settings = Settings(**sampling(req, req.max_tokens, default_max_tokens), stop=stops(req), adapter=adapter)
    return _parsed(False, req, model, ids, text, settings, echo=bool(req.echo))


def parse_chat(req: ChatCompletionRequest, limits: ModelLimits, fmt: ChatFormat,
               default_max_tokens: int) -> ParsedRequest:
    model, adapter = req.model, limits.adapter(req.model)
    messages = [(m.role, m.text) for m in req.messages]
    if not any(text.strip() for _, text in messages):
        raise bad("messages", "every message in 'messages' is empty: say something", "empty_prompt")
    try:  # the API never drops turns: what the client sent is what the model sees
        prompt = build_chat_prompt(messages, fmt, limits.context, truncate=False)
    except PromptTooLong as e:
        raise APIError(400, f"This model's maximum context length is {limits.context} tokens, but the "
                       f"messages are {e.n_tokens} tokens: shorten them", "messages",
                       "context_length_exceeded") from None
    except ValueError as e:  # the model's chat template refused the conversation
        raise bad("messages", f"'messages': {e}") from None
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    _check_room(len(prompt.ids), max_tokens, limits,
                "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens")
    settings = Settings.for_chat(fmt, stops(req), **sampling(req, max_tokens, default_max_tokens), adapter=adapter)
    return _parsed(True, req, model, prompt.ids, prompt.text, settings)
