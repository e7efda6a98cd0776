"""OpenAI request bodies -> what the engine runs, with errors OpenAI clients understand.

Every check names the offending field in ``error.param`` (``"messages[1].content"``) and
says what would be valid. The shapes follow OpenAI's ``/v1/completions`` and
``/v1/chat/completions``; fields this server cannot honour (``n`` > 1, ``logprobs``,
penalties, tools) are refused rather than silently ignored, and unknown fields are
refused as OpenAI does ("Unrecognized request argument supplied").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from smolcluster.serving.engine import Settings
from smolcluster.serving.prompting import (
    ROLE_LABELS,
    TURN_STOPS,
    PromptTooLong,
    build_chat_prompt,
    message_text,
)

COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "n", "stream", "stream_options", "stop",
          "seed", "user", "logprobs", "presence_penalty", "frequency_penalty", "logit_bias"}
COMPLETION_FIELDS = COMMON | {"prompt", "echo", "best_of", "suffix"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
                        "response_format", "parallel_tool_calls", "store", "metadata", "service_tier"}
# Accepted only at the value that means "off" (what a client sends when it does not use them).
OFF_VALUES = {"logprobs": (None, False, 0), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
              "logit_bias": (None, {}), "best_of": (None, 1), "suffix": (None, ""), "top_logprobs": (None, 0),
              "tools": (None, []), "tool_choice": (None, "none", "auto"),
              "response_format": (None, {"type": "text"})}
MAX_STOPS = 4


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


# -- field readers ----------------------------------------------------------------------------------------
def _type_name(v) -> str:
    return "null" if v is None else type(v).__name__


def read_int(body: dict, name: str, default, lo: int | None = None, hi: int | None = None):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, float) and v.is_integer():  # JSON clients sometimes send 16.0
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool):
        raise bad(name, f"'{name}' must be an integer, got {v!r} ({_type_name(v)})", "invalid_type")
    if lo is not None and v < lo:
        raise bad(name, f"'{name}' must be at least {lo}, got {v}")
    if hi is not None and v > hi:
        raise bad(name, f"'{name}' must be at most {hi}, got {v}")
    return v


def read_number(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise bad(name, f"'{name}' must be a number, got {v!r} ({_type_name(v)})", "invalid_type")
    if not lo <= v <= hi:
        raise bad(name, f"'{name}' must be between {lo} and {hi}, got {v}")
    return float(v)


def read_bool(body: dict, name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(name, f"'{name}' must be true or false, got {v!r} ({_type_name(v)})", "invalid_type")
    return v


def read_stops(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise bad("stop", f"'stop' must be a string or a list of strings, got {v!r}", "invalid_type")
    if len(v) > MAX_STOPS:
        raise bad("stop", f"'stop' takes at most {MAX_STOPS} sequences, got {len(v)}")
    return tuple(s for s in v if s)


def check_fields(body, allowed: set[str]) -> None:
    if not isinstance(body, dict):
        raise bad(None, f"the request body must be a JSON object, got {_type_name(body)}", "invalid_type")
    for name in body:
        if name not in allowed:
            raise bad(name, f"Unrecognized request argument supplied: {name}", "unknown_parameter")
    for name, off in OFF_VALUES.items():
        if name in body and body[name] not in off:
            raise bad(name, f"'{name}' is not supported by this server (leave it out)", "unsupported_parameter")


def check_model(body: dict, limits: ModelLimits) -> str:
    model = body.get("model")
    if model is None:
        raise bad("model", "you must provide a model parameter (GET /v1/models lists it)", "missing_required_parameter")
    if not isinstance(model, str):
        raise bad("model", f"'model' must be a string, got {model!r} ({_type_name(model)})", "invalid_type")
    if model != limits.name:
        raise APIError(404, f"The model '{model}' does not exist: this server serves '{limits.name}'", "model",
                       "model_not_found")
    return model


def common_settings(body: dict, default_max_tokens: int, max_tokens_field: str = "max_tokens") -> dict:
    if read_int(body, "n", 1, lo=1) != 1:
        raise bad("n", "'n' must be 1: this server makes one choice per request (send several requests)")
    max_tokens = read_int(body, max_tokens_field, None, lo=1)
    if max_tokens_field != "max_tokens" and max_tokens is None:
        max_tokens = read_int(body, "max_tokens", None, lo=1)
    temperature = read_number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = read_number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:  # only the most likely token is left: greedy
        temperature, top_p = 0.0, 1.0
    stream_options = body.get("stream_options")
    if stream_options is not None and (not isinstance(stream_options, dict)
                                       or not isinstance(stream_options.get("include_usage", False), bool)):
        raise bad("stream_options", "'stream_options' must be an object like {\"include_usage\": true}",
                  "invalid_type")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise bad("user", f"'user' must be a string, got {_type_name(user)}", "invalid_type")
    stream = read_bool(body, "stream", False)
    return {"max_new_tokens": max_tokens if max_tokens is not None else default_max_tokens,
            "temperature": temperature, "top_p": top_p, "top_k": read_int(body, "top_k", 0, lo=0),
            "seed": read_int(body, "seed", None, lo=0, hi=2**63 - 1), "stop": read_stops(body),
            "stream": stream, "include_usage": bool(stream and (stream_options or {}).get("include_usage")),
            "user": user}


def _check_fits(n: int, limits: ModelLimits, param: str) -> None:
    if n > limits.context:
        raise APIError(400, f"This model's maximum context length is {limits.context} tokens, but the "
                       f"{param} is {n} tokens: shorten it", param, "context_length_exceeded")


# -- the two endpoints --------------------------------------------------------------------------------------
def parse_completion(body, limits: ModelLimits, tokenizer, default_max_tokens: int = 16) -> ParsedRequest:
    check_fields(body, COMPLETION_FIELDS)
    model = check_model(body, limits)
    s = common_settings(body, default_max_tokens)
    prompt = body.get("prompt")
    if prompt is None:
        raise bad("prompt", "you must provide a prompt", "missing_required_parameter")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise bad("prompt", "the prompt is empty: give some text to continue", "empty_prompt")
        ids, text = tokenizer.encode(prompt), prompt
        if not ids:
            raise bad("prompt", "the prompt encodes to no tokens: give some text to continue", "empty_prompt")
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if not prompt:
            raise bad("prompt", "the prompt is empty: give at least one token", "empty_prompt")
        bad_ids = [t for t in prompt if not 0 <= t < limits.vocab_size]
        if bad_ids:
            raise bad("prompt", f"'prompt' token ids must be in [0, {limits.vocab_size}): got {bad_ids[:5]}")
        ids, text = list(prompt), tokenizer.decode(prompt)
    elif isinstance(prompt, list):
        raise bad("prompt", "'prompt' must be one string or one list of token ids (batches of several prompts "
                  "are not served: send one request each)", "invalid_type")
    else:
        raise bad("prompt", f"'prompt' must be a string or a list of token ids, got {_type_name(prompt)}",
                  "invalid_type")
    _check_fits(len(ids), limits, "prompt")
    settings = Settings(max_new_tokens=s["max_new_tokens"], temperature=s["temperature"], top_k=s["top_k"],
                        top_p=s["top_p"], seed=s["seed"], stop=s["stop"])
    return ParsedRequest(False, model, ids, text, settings, s["stream"], s["include_usage"],
                         read_bool(body, "echo", False), s["user"])


def parse_messages(messages) -> list[tuple[str, str]]:
    if messages is None:
        raise bad("messages", "you must provide messages", "missing_required_parameter")
    if not isinstance(messages, list):
        raise bad("messages", f"'messages' must be a list, got {_type_name(messages)}", "invalid_type")
    if not messages:
        raise bad("messages", "'messages' is empty: give at least one message", "empty_prompt")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(where, f"'{where}' must be an object with role and content", "invalid_type")
        role = m.get("role")
        if role not in ROLE_LABELS:
            raise bad(f"{where}.role", f"'{where}.role' is {role!r}: this server takes "
                      f"{', '.join(ROLE_LABELS)} messages")
        if m.get("content") is None:
            raise bad(f"{where}.content", f"'{where}.content' is missing", "missing_required_parameter")
        try:
            text = message_text(m["content"])
        except ValueError as e:
            raise bad(f"{where}.content", f"'{where}.content': {e}", "invalid_type") from None
        out.append((role, text))
    if not any(text.strip() for _, text in out):
        raise bad("messages", "every message in 'messages' is empty: say something", "empty_prompt")
    return out


def parse_chat(body, limits: ModelLimits, tokenizer, default_max_tokens: int) -> ParsedRequest:
    check_fields(body, CHAT_FIELDS)
    model = check_model(body, limits)
    s = common_settings(body, default_max_tokens, max_tokens_field="max_completion_tokens")
    messages = parse_messages(body.get("messages"))
    try:  # the API never drops turns: what the client sent is what the model sees
        prompt = build_chat_prompt(messages, tokenizer.encode, limits.context, truncate=False)
    except PromptTooLong as e:
        raise APIError(400, f"This model's maximum context length is {limits.context} tokens, but the "
                       f"messages are {e.n_tokens} tokens: shorten them", "messages",
                       "context_length_exceeded") from None
    settings = Settings(max_new_tokens=s["max_new_tokens"], temperature=s["temperature"], top_k=s["top_k"],
                        top_p=s["top_p"], seed=s["seed"], stop=TURN_STOPS + s["stop"], trim_leading_space=True)
    return ParsedRequest(True, model, prompt.ids, prompt.text, settings, s["stream"], s["include_usage"], False,
                         s["user"])
