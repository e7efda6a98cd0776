"""A conversation -> one prompt the model continues, cut to fit its context.

The models served here (GPT-2 and what ``train`` makes) have no chat template, so a
conversation becomes a plain transcript the model can continue:

    System: You are terse.
    User: Hi
    Assistant: Hello!
    User: What is 2+2?
    Assistant:

and the answer ends where the model starts a new turn (:data:`TURN_STOPS`). When the
transcript does not fit, the oldest turns go first (leading system messages stay);
the prompt never starts on an answer whose question was cut. The last message is
never cut: if it alone does not fit, that is an error the user must fix.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from smolcluster.errors import SmolclusterError

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


def prompt_budget(context: int, max_new_tokens: int) -> int:
    """Prompt tokens to allow: leave room for the answer, but never more than half the context."""
    return context - min(max(max_new_tokens, 0), context // 2)


def build_chat_prompt(messages: list[tuple[str, str]], encode: Callable[[str], list[int]],
                      budget: int | None = None, truncate: bool = True) -> ChatPrompt:
    """The prompt for ``messages`` (``(role, text)``, roles in :data:`ROLE_LABELS`) within ``budget`` tokens.

    ``truncate=False`` (the API) refuses a conversation that does not fit instead of cutting it.
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
        text = render(pinned + turns[start:])
        ids = encode(text)
        if budget is None or len(ids) <= budget:
            return ChatPrompt(text, ids, start)
        if not truncate or start >= len(turns) - 1:
            break
        start += 1
        while start < len(turns) - 1 and turns[start][0] == "assistant":  # never open on an orphan answer
            start += 1
    if truncate and pinned:  # the system prompt goes last, before giving up
        text = render(turns[-1:])
        ids = encode(text)
        if len(ids) <= budget:
            return ChatPrompt(text, ids, len(messages) - 1)
    what = "the conversation" if not truncate else "the last message (with its cue)"
    raise PromptTooLong(len(ids), budget, what)
