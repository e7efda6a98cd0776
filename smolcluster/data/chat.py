"""Conversations for supervised fine-tuning: ``data=chat data.path=FILE.jsonl``.

One conversation per line, in the OpenAI ``messages`` format::

    {"messages": [{"role": "system", "content": "You are terse."},
                  {"role": "user", "content": "What is 2+2?"},
                  {"role": "assistant", "content": "4"}]}

Each is rendered with the model directory's chat template, through
:class:`smolcluster.serving.prompting.ChatTemplate` (what serving renders prompts with), and the
loss is on the assistant's tokens only: every other target is -100, which ``F.cross_entropy``
ignores. An assistant span is the text its message adds to the conversation, found by rendering the
conversation up to the answer's cue and up to the answer's end: the content and the template's
end-of-turn token (``<|im_end|>``), so the model learns where to stop.

Rows are ``model.block_size`` tokens. ``data.packing=false``: one conversation a row, padded
(pad targets -100); a longer one is cut at its end (``data.truncation=cut``) or left out
(``drop``). ``data.packing=true``: the conversations end to end, cut into rows as ``data=text``
cuts a corpus (no padding; a row may hold the end of one conversation and the start of the next).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from loguru import logger

from smolcluster.errors import DataError
from smolcluster.serving.prompting import ROLE_LABELS, ChatTemplate, message_text

IGNORE = -100  # F.cross_entropy's ignore_index: no loss on these targets
TRUNCATION = ("cut", "drop")


def read_conversations(path: str | Path) -> list[list[tuple[str, str]]]:
    """Every line's ``(role, text)`` messages; a malformed line is refused with its number."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"data.path={path}: no such file; data=chat needs a JSONL file of {{\"messages\": [...]}} lines")
    out = []
    with p.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(_messages(json.loads(line)))
                except (ValueError, TypeError, KeyError) as e:
                    raise DataError(f"{p}:{number}: {e}; each line must be "
                                    '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}]}') from None
    if not out:
        raise DataError(f"data.path={path}: no conversations in it")
    return out


def _messages(obj) -> list[tuple[str, str]]:
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
        raise ValueError("no \"messages\" list")
    messages = []
    for m in obj["messages"]:
        if not isinstance(m, dict) or m.get("role") not in ROLE_LABELS:
            raise ValueError(f"message {m!r} has no role of {', '.join(ROLE_LABELS)}")
        messages.append((m["role"], message_text(m.get("content"))))
    if not any(role == "assistant" for role, _ in messages):
        raise ValueError("no assistant message (nothing to learn from)")
    return messages


def encode(fmt: ChatTemplate, messages: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
    """The conversation's token ids, and its labels: the id on assistant spans, :data:`IGNORE` elsewhere."""
    text, _ = fmt.render(messages, add_generation_prompt=False)
    spans = []
    for i, (role, _) in enumerate(messages):
        if role != "assistant":
            continue
        before = fmt.render(messages[:i], add_generation_prompt=True)[0] if i else ""
        through = fmt.render(messages[: i + 1], add_generation_prompt=False)[0]
        if not (text.startswith(through) and through.startswith(before)):
            raise DataError("the chat template does not render a conversation as the sum of its turns, so its "
                            "assistant spans cannot be found: use a model whose template does")
        spans.append((len(before), len(through)))
    enc = fmt.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    # a token is the assistant's when its characters overlap an assistant span (as transformers'
    # return_assistant_tokens_mask marks a {% generation %} span)
    labels = [t if any(s < b and e > a for a, b in spans) else IGNORE for t, (s, e) in zip(ids, enc["offset_mapping"])]
    return ids, labels


def rows(encoded: list[tuple[list[int], list[int]]], block: int, packing: bool, truncation: str,
         pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) rows of ``block`` tokens: targets are the next token's label."""
    if packing:
        ids = torch.tensor([t for i, _ in encoded for t in i])
        labels = torch.tensor([t for _, lab in encoded for t in lab])
        n = (len(ids) - 1) // block
        if n < 1:
            raise DataError(f"the conversations have {len(ids)} tokens, fewer than one row of {block}")
        return ids[: n * block].view(n, block), labels[1 : n * block + 1].view(n, block)
    xs, ys, dropped = [], [], 0
    for ids, labels in encoded:
        if len(ids) > block + 1 and truncation == "drop" or not any(t != IGNORE for t in labels[1 : block + 1]):
            dropped += 1  # too long, or its answer lies beyond the cut
            continue
        ids, labels = ids[: block + 1], labels[: block + 1]
        pad = block + 1 - len(ids)
        xs.append(ids[:-1] + [pad_id] * pad)
        ys.append(labels[1:] + [IGNORE] * pad)
    if dropped:
        logger.warning(f"data=chat: {dropped} of {len(encoded)} conversations left out (longer than "
                       f"model.block_size={block} with data.truncation={truncation}, or no answer within it)")
    if not xs:
        raise DataError(f"data=chat: no conversation fits model.block_size={block}: raise it or set data.truncation=cut")
    return torch.tensor(xs), torch.tensor(ys)


def load(data_cfg, block: int, model_dir: str | Path):
    """Train and validation rows of ``data.path``, rendered with ``model_dir``'s chat template, and its template."""
    truncation = data_cfg.get("truncation", "cut")
    if truncation not in TRUNCATION:
        raise DataError(f"data.truncation={truncation!r}: choose {' | '.join(TRUNCATION)}")
    fmt = ChatTemplate.load(model_dir)
    if fmt is None:
        raise DataError(f"{model_dir} has no chat template (tokenizer_config.json chat_template or chat_template.jinja): "
                        "data=chat renders conversations with it; give model.pretrained=DIR of an instruct model")
    conversations = read_conversations(data_cfg["path"])
    encoded = [encode(fmt, m) for m in conversations]
    n_val = max(1, int(len(encoded) * data_cfg.get("val_fraction", 0.1))) if len(encoded) > 1 else 0
    pad_id = fmt.tokenizer.pad_token_id if fmt.tokenizer.pad_token_id is not None else (fmt.end_ids or (0,))[0]
    packing = bool(data_cfg.get("packing", False))
    tx, ty = rows(encoded[: len(encoded) - n_val], block, packing, truncation, pad_id)
    vx, vy = rows(encoded[len(encoded) - n_val:] or encoded, block, packing, truncation, pad_id)
    return tx, ty, vx, vy
