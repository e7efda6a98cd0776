"""The OpenAI API's bodies as pydantic models: what the server validates and returns, and what
``/openapi.json`` publishes, so generated clients and API tools see the real contract.

Requests are strict (``"10"`` is not a number, ``"yes"`` not a boolean) and refuse unknown
fields, as OpenAI does. Fields this server cannot honour (``logprobs``, penalties, tools)
are accepted only at the values that mean "off" (what a client sends when it does not use
them); their schema lists exactly those values. A failed check becomes an OpenAI error
naming the field (:func:`validation_error`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
)
from pydantic_core import PydanticCustomError

MAX_STOPS = 4
ROLES = ("system", "developer", "user", "assistant")


def _whole(v):
    return int(v) if isinstance(v, float) and v.is_integer() else v  # JSON clients sometimes send 16.0


def integer(description: str, **constraints):
    return Annotated[int, Field(description=description, **constraints), BeforeValidator(_whole)]


def number(description: str, lo: float, hi: float):
    return Annotated[float, Field(description=description, ge=lo, le=hi, allow_inf_nan=False)]


def problem(code: str, message: str) -> PydanticCustomError:
    """A check of ours failed: ``code`` becomes the error's ``code``, the message follows the field's name."""
    return PydanticCustomError(code, message)


def _is_off(v, off: tuple) -> bool:
    return any(v == o and isinstance(v, bool) == isinstance(o, bool) for o in off)


def unsupported(*off):
    """A field this server cannot honour: accepted only as null or one of ``off``."""

    def check(v):
        if v is not None and not _is_off(v, off):
            raise problem("unsupported_parameter", "is not supported by this server (leave it out)")
        return v

    return Annotated[Any, AfterValidator(check), WithJsonSchema(
        {"enum": [None, *off], "description": "Not supported by this server: leave it out."})]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# -- requests ------------------------------------------------------------------------------------------------
class StreamOptions(Strict):
    include_usage: bool = Field(False, description="Send a last chunk with the usage (its choices empty).")


class SamplingRequest(Strict):
    """What both endpoints take."""

    model: str = Field(description="The model's id, as GET /v1/models lists it.")
    max_tokens: integer("Tokens to generate at most.", ge=1) | None = None
    temperature: number("0 = greedy; default 1.", 0.0, 2.0) | None = None
    top_p: number("Nucleus sampling; 0 = greedy, 1 = off (default).", 0.0, 1.0) | None = None
    top_k: integer("Sample from the k most likely tokens; 0 = off (default).", ge=0) | None = None
    n: integer("Choices per request: this server makes one (send several requests).", ge=1, le=1) | None = None
    stream: bool | None = Field(None, description="Answer with server-sent events, a chunk per piece of text.")
    stream_options: StreamOptions | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOPS)] | None = Field(
        None, description=f"Up to {MAX_STOPS} strings that end the answer (not included in it).")
    seed: integer("Sampling seed: the same seed and request give the same text.", ge=0, lt=2**63) | None = None
    user: str | None = Field(None, description="Who asks: requests are served round-robin over users.")
    logprobs: unsupported(False, 0) = None
    presence_penalty: unsupported(0) = None
    frequency_penalty: unsupported(0) = None
    logit_bias: unsupported({}) = None

    @field_validator("n", mode="wrap")
    @classmethod
    def _n(cls, v, handler):
        try:
            return handler(v)
        except ValidationError:
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                raise problem("invalid_value", "must be 1: this server makes one choice per request (send "
                              "several requests)") from None
            raise

    @field_validator("stop", mode="wrap")
    @classmethod
    def _stop(cls, v, handler):
        try:
            return handler(v)
        except ValidationError:
            if isinstance(v, list) and all(isinstance(s, str) for s in v):
                raise problem("invalid_value", f"takes at most {MAX_STOPS} sequences, got {len(v)}") from None
            raise problem("invalid_type", f"must be a string or a list of strings, got {v!r}") from None


Text = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
EMPTY_PROMPTS = ("", [], [""], [[]])


class CompletionRequest(SamplingRequest):
    """POST /v1/completions: continue a prompt."""

    prompt: Text | TokenIds | Annotated[list[Text], Field(min_length=1, max_length=1)] \
        | Annotated[list[TokenIds], Field(min_length=1, max_length=1)] = Field(
            description="The text to continue, or its token ids; a batch of one of either is accepted.")
    echo: bool | None = Field(None, description="Return the prompt before the completion.")
    best_of: unsupported(1) = None
    suffix: unsupported("") = None

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _prompt(cls, v, handler):
        try:
            v = handler(v)
        except ValidationError:
            if any(v == e and type(v) is type(e) for e in EMPTY_PROMPTS):
                raise problem("empty_prompt", "is empty: give some text (or token ids) to continue") from None
            if isinstance(v, list) and len(v) > 1 and all(isinstance(p, (str, list)) for p in v):
                raise problem("invalid_type", "must be one string or one list of token ids (batches of several "
                              "prompts are not served: send one request each)") from None
            if isinstance(v, list) and any(isinstance(t, int) and not isinstance(t, bool) and t < 0 for t in v):
                raise problem("invalid_value", f"token ids must not be negative: got {v[:5]}") from None
            raise problem("invalid_type", "must be a string or a list of token ids, got "
                          f"{type(v).__name__ if v is not None else 'null'}") from None
        return v[0] if isinstance(v, list) and isinstance(v[0], (str, list)) else v  # a batch of one


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)
    type: Literal["text"] = "text"
    text: str


class Message(BaseModel):
    """A chat message (other keys, e.g. ``name``, are ignored)."""

    model_config = ConfigDict(strict=True)
    role: Literal[ROLES] = Field(description="Who said it.")
    content: str | list[TextPart] = Field(description="Its text: a string, or text parts (only text is served).")

    @field_validator("content", mode="wrap")
    @classmethod
    def _content(cls, v, handler):
        try:
            return handler(v)
        except ValidationError:
            if v is None:
                raise problem("missing_required_parameter", "is missing") from None
            if isinstance(v, list):
                part = next((p for p in v if not (isinstance(p, dict) and p.get("type", "text") == "text"
                                                  and isinstance(p.get("text"), str))), v)
                raise problem("invalid_type", f"has an unsupported content part {part!r}: only text is "
                              "served") from None
            raise problem("invalid_type", f"must be a string or a list of text parts, got {type(v).__name__}") \
                from None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions: answer a conversation."""

    messages: Annotated[list[Message], Field(min_length=1)] = Field(
        description="The conversation so far, oldest first; the model answers the last message.")
    max_completion_tokens: integer("Tokens to generate at most (overrides max_tokens).", ge=1) | None = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    top_logprobs: unsupported(0) = None
    tools: unsupported([]) = None
    tool_choice: unsupported("none", "auto") = None
    response_format: unsupported({"type": "text"}) = None


# -- responses -------------------------------------------------------------------------------------------------
FinishReason = Literal["stop", "length", "cancelled", "error"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None = Field(description="null until the last chunk of a stream.")


class Completion(BaseModel):
    """A completion, or (streaming) one chunk of it: the last chunk of a stream with
    ``include_usage`` has no choices and the usage."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    """What a chunk adds: the first has the role (and empty content), the last neither (``{}``)."""

    role: Literal["assistant"] | None = Field(None, exclude_if=lambda v: v is None)
    content: str | None = Field(None, exclude_if=lambda v: v is None)


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: None = None
    finish_reason: FinishReason | None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    architecture: str = Field(description="The model family (config.json's model_type): gpt2, llama, qwen2, ...")
    context_length: int = Field(description="Tokens of prompt and answer together.")
    vocab_size: int
    kernels: list[str] = Field(default_factory=list, description="Each pipeline stage's matmul kernels, in words "
                               "(its precision's path on its machine: packed int8/int4, oneDNN bf16, ...).")
    decode: list[str] = Field(default_factory=list, description="Each pipeline stage's decode step: compiled "
                              "(torch.compile) or eager, and why where compile=auto chose.")
    parent: str | None = Field(None, description="A LoRA adapter's base model (its id is BASE:NAME); null for "
                               "the base model.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = Field(description='The offending field, e.g. "messages[1].content".')
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorBody


def dump(body: BaseModel, exclude: set[str] | None = None) -> dict:
    """A response body as JSON."""
    return body.model_dump(mode="json", exclude=exclude)


# -- validation errors -> OpenAI errors ----------------------------------------------------------------------------
OUR_CODES = {"unsupported_parameter", "invalid_type", "invalid_value", "empty_prompt", "missing_required_parameter"}


def field_path(loc) -> str | None:
    """``("body", "messages", 1, "content")`` -> ``"messages[1].content"`` (None for the body itself)."""
    parts = [p for p in loc if p != "body"] if loc and loc[0] == "body" else list(loc)
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".")
    return path or None


def validation_error(error: dict) -> tuple[str | None, str, str]:
    """One of pydantic's (or FastAPI's) errors as OpenAI's (``param``, ``message``, ``code``)."""
    kind, loc = error["type"], tuple(error.get("loc", ()))
    if kind == "json_invalid":
        detail = (error.get("ctx") or {}).get("error", error.get("msg"))
        return None, f"the request body is not valid JSON: {detail}", "invalid_json"
    param = field_path(loc)
    if param is None:
        return None, "the request body must be a JSON object (Content-Type: application/json)", "invalid_type"
    if kind in OUR_CODES:
        return param, f"'{param}' {error['msg']}", kind
    if kind == "missing":
        return param, f"you must provide '{param}'", "missing_required_parameter"
    if kind == "extra_forbidden":
        return param, f"Unrecognized request argument supplied: {param}", "unknown_parameter"
    msg = error["msg"]
    code = "invalid_type" if kind.endswith(("_type", "_parsing")) else "invalid_value"
    return param, f"'{param}': {msg[0].lower()}{msg[1:]}, got {error.get('input')!r}", code
