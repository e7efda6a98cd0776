"""A conversation -> the prompt ids the model continues, cut to fit its context.

The one place the chat page and ``/v1/chat/completions`` turn messages into a prompt.
A model directory with a chat template (Hugging Face's ``tokenizer_config.json``
``chat_template``, or ``chat_template.jinja``) renders conversations with it
(:class:`ChatTemplate`), so an instruct model sees the format it was trained on, and
its answer ends at the template's end-of-turn token. Models without one (GPT-2, what
``train`` makes) get a plain transcript they can continue (:class:`Transcript`):

    System: You are terse.
    User: Hi
    Assistant: Hello!
    User: What is 2+2?
    Assistant:

and the answer ends where the model starts a new turn (:data:`TURN_STOPS`). When the
conversation does not fit, the oldest turns go first (leading system messages stay);
the prompt never starts on an answer whose question was cut. The last message is
never cut: if it alone does not fit, that is an error the user must fix.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from smolcluster.errors import ConfigError, SmolclusterError

ROLE_LABELS = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
TURN_STOPS = ("\nUser:", "\nSystem:", "\nAssistant:")


class PromptTooLong(SmolclusterError):
    def __init__(self, n_tokens: int, limit: int, what: str = "the prompt"):
        self.n_tokens, self.limit = n_tokens, limit
        super().__init__(f"{what} is {n_tokens} tokens, more than the {limit} that fit in the model's "
                         "context: shorten it")


@dataclass(frozen=True)
class ChatPrompt:
    text: str
    ids: list[int]
    dropped: int  # messages left out, oldest first, to fit


def message_text(content) -> str:
    """A message's text: a string, or OpenAI / Gradio content parts ``[{"type": "text", "text": ...}]``."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        content = [content]
    if not isinstance(content, (list, tuple)):
        raise ValueError(f"content must be a string or a list of text parts, got {type(content).__name__}")
    parts = []
    for part in content:
        if isinstance(part, str):
            parts.append(part)
        elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
            parts.append(part["text"])
        else:
            raise ValueError(f"unsupported message content part {part!r}: only text is served")
    return "".join(parts)


def render(messages: list[tuple[str, str]]) -> str:
    """The transcript of ``(role, text)`` messages, ending with the cue for the assistant's answer."""
    lines = [f"{ROLE_LABELS[role]}: {text.strip()}" for role, text in messages]
    return "\n".join([*lines, "Assistant:"])


class Transcript:
    """The fallback for models without a chat template: the ``User:/Assistant:`` transcript of :func:`render`."""

    stops = TURN_STOPS            # the answer ends where the model starts the next turn
    end_ids: tuple[int, ...] = ()
    trim_leading_space = True     # the model puts a space after "Assistant:"

    def __init__(self, encode: Callable[[str], list[int]]):
        self.encode = encode

    def render(self, messages: list[tuple[str, str]]) -> tuple[str, list[int]]:
        text = render(messages)
        return text, self.encode(text)


class ChatTemplate:
    """A model's own chat template, rendered by its Hugging Face tokenizer (``apply_chat_template``).

    ``end_ids``: the tokens that end an answer: every EOS id of ``generation_config.json``
    (an int or a list), the tokenizer's ``eos_token``, and the token the template closes an
    assistant turn with (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``...), which some
    models do not list as EOS.
    """

    stops: tuple[str, ...] = ()
    trim_leading_space = False

    def __init__(self, tokenizer, end_ids: tuple[int, ...] = ()):
        self.tokenizer, self.end_ids = tokenizer, tuple(end_ids)

    @staticmethod
    def has_template(model_dir: str | Path) -> bool:
        d = Path(model_dir).expanduser()
        if (d / "chat_template.jinja").is_file():
            return True
        config = d / "tokenizer_config.json"
        return config.is_file() and bool(json.loads(config.read_text()).get("chat_template"))

    @classmethod
    def load(cls, model_dir: str | Path) -> ChatTemplate | None:
        """The chat template of a Hugging Face model directory; None when it has none."""
        d = Path(model_dir).expanduser()
        if not cls.has_template(d):
            return None
        from transformers import AutoTokenizer  # the head only: stages never import transformers

        try:
            tok = AutoTokenizer.from_pretrained(str(d))
        except Exception as e:  # e.g. a tokenizer class that needs a package not installed here
            raise ConfigError(f"{d} has a chat template, but its tokenizer does not load with transformers "
                              f"({type(e).__name__}: {e}): install what it names, or serve a model whose "
                              "tokenizer.json loads") from None
        end = [*eos_ids(d), tok.eos_token_id, cls._turn_end_id(tok)]
        return cls(tok, tuple(dict.fromkeys(i for i in end if i is not None)))

    @staticmethod
    def _turn_end_id(tok) -> int | None:
        """The special token right after an assistant message in this template, if there is one."""
        mark = "\x00answer\x00"
        try:
            text = tok.apply_chat_template([{"role": "user", "content": "?"}, {"role": "assistant", "content": mark}],
                                           tokenize=False)
        except Exception as e:  # a template that needs more (tools, alternation rules): EOS ids only
            logger.debug(f"chat template: no end-of-turn token found ({e})")
            return None
        after = text[text.find(mark) + len(mark):].lstrip() if mark in text else ""
        ids = tok(after, add_special_tokens=False)["input_ids"] if after else []
        special = {i for i, t in tok.added_tokens_decoder.items() if t.special}
        return ids[0] if ids and ids[0] in special else None

    def render(self, messages: list[tuple[str, str]], add_generation_prompt: bool = True) -> tuple[str, list[int]]:
        """The text and ids of ``messages``, ending with the cue for the assistant's answer (or, without
        ``add_generation_prompt``, as a finished conversation: the training data of ``data=chat``)."""
        import jinja2

        convo = [{"role": "system" if role == "developer" else role, "content": text} for role, text in messages]
        try:
            text = self.tokenizer.apply_chat_template(convo, add_generation_prompt=add_generation_prompt,
                                                      tokenize=False)
        except jinja2.TemplateError as e:  # "System role not supported", "roles must alternate", ...
            raise ValueError(f"the model's chat template refuses this conversation: {e}") from None
        # as apply_chat_template(tokenize=True) does: the template writes its own BOS and control tokens
        return text, self.tokenizer(text, add_special_tokens=False)["input_ids"]


ChatFormat = Transcript | ChatTemplate


def eos_ids(model_dir: str | Path) -> list[int]:
    """Every EOS id a Hugging Face model directory lists (``generation_config.json``, else ``config.json``)."""
    for name in ("generation_config.json", "config.json"):
        path = Path(model_dir).expanduser() / name
        if path.is_file():
            eos = json.loads(path.read_text()).get("eos_token_id")
            if eos is not None:
                return [int(i) for i in (eos if isinstance(eos, list) else [eos])]
    return []


def prompt_budget(context: int, max_new_tokens: int) -> int:
    """Prompt tokens to allow: leave room for the answer, but never more than half the context."""
    return context - min(max(max_new_tokens, 0), context // 2)


def build_chat_prompt(messages: list[tuple[str, str]], fmt: ChatFormat, budget: int | None = None,
                      truncate: bool = True) -> ChatPrompt:
    """The prompt for ``messages`` (``(role, text)``, roles in :data:`ROLE_LABELS`) in ``fmt`` within
    ``budget`` tokens. ``truncate=False`` (the API) refuses a conversation that does not fit instead of
    cutting it. A template that refuses the conversation raises ValueError.
    """
    for role, _ in messages:
        if role not in ROLE_LABELS:
            raise ValueError(f"unknown role {role!r}: use one of {', '.join(ROLE_LABELS)}")
    if not messages:
        raise ValueError("no messages")
    n_pinned = 0
    while n_pinned < len(messages) - 1 and ROLE_LABELS[messages[n_pinned][0]] == "System":
        n_pinned += 1
    pinned, turns = messages[:n_pinned], messages[n_pinned:]
    start = 0
    while True:
        text, ids = fmt.render(pinned + turns[start:])
        if budget is None or len(ids) <= budget:
            return ChatPrompt(text, ids, start)
        if not truncate or start >= len(turns) - 1:
            break
        start += 1
        while start < len(turns) - 1 and turns[start][0] == "assistant":  # never open on an orphan answer
            start += 1
    if truncate and pinned:  # the system prompt goes last, before giving up
        text, ids = fmt.render(turns[-1:])
        if len(ids) <= budget:
            return ChatPrompt(text, ids, len(messages) - 1)
    what = "the conversation" if not truncate else "the last message (with its cue)"
    raise PromptTooLong(len(ids), budget, what)
