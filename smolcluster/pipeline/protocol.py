"""The pipeline's message kinds, registered with the wire format (:mod:`smolcluster.transport.wire`).

Every pipeline message carries ``src`` (the sender's node name) and ``seq`` (its
sequence number on the sender->receiver link, see :mod:`smolcluster.pipeline.mesh`);
the wire checks every field's type before anything reads it. Tensors travel as raw
frames (no pickle): activations are sent from contiguous memory with ``copy=False``
and arrive as read-only numpy views of the frame. Kinds carrying numbers that feed
the model (activations, gradients, norms) are ``finite``: NaN/Inf is refused on receipt.
"""

from __future__ import annotations

import numpy as np

from smolcluster.transport import wire

_NUM = (int, float)
_COMMON = {"src": str, "seq": int}

# What a request's first ``hidden`` rows carry (``intro[req]``), so later stages learn of it in order
# (a head's ``submit`` goes to stage 0 only: nothing can overtake it on another link).
REQUEST_FIELDS = {"head": str, "max_new_tokens": int, "temperature": _NUM, "top_k": int, "top_p": _NUM,
                  "seed": int, "eos": list, "prompt_len": int,  # eos: the ids generation stops at
                  "adapter": str,  # the LoRA adapter the request's rows go through ("": the base model)
                  "prefix": list}  # the prefix-cache blocks (keys) it starts from (inference/prefix.py)

# kind -> (required fields, finite?)
KINDS: dict[str, tuple[dict, bool]] = {
    # every node, always
    "mp.heartbeat": ({"inc": str, "heard": list, "sent": dict, "to_inc": dict, "info": dict}, False),
    "mp.bye": ({}, False),
    # training (GPipe)
    "mp.act": ({"step": int, "mb": int, "phase": str}, True),   # tensors: x, activations into the next stage
    "mp.grad": ({"step": int, "mb": int}, True),                # tensors: g, d loss / d those activations
    "mp.tied": ({"step": int}, True),                           # tensors: g, this stage's tied-embedding grad
    "mp.norm": ({"step": int, "sq": _NUM}, True),               # squared grad norm, for global clipping
    # inference
    # speculate: which drafter proposes its tokens ("": the stages' default, off, lookup, draft; speculate.py)
    "mp.submit": ({"req": str, "speculate": str, **{k: v for k, v in REQUEST_FIELDS.items() if k not in ("head", "prompt_len", "prefix")}},
                  True),                                        # tensors: ids, the prompt
    # Not `finite`: a NaN in inference only spoils that request's tokens, and the check costs ~20 us a hop.
    # A batched step's rows: reqs[i] has sizes[i] rows of x; emit[i]: its last row makes a token.
    # trim[req]: cut its KV cache to this length before its rows (speculative decoding's rejected proposals).
    # prefix: stage 0's prefix-cache ops, replayed first: ["e", key] evicts, ["s", key, req, i] stores block i.
    # drafts[req]: its proposals, for the last stage to check (head=last); sampled: the requests whose draft
    # model's probabilities are the tensor q's rows, one a proposal, in this order.
    "mp.hidden": ({"reqs": list, "sizes": list, "emit": list, "intro": dict, "trim": dict, "prefix": list,
                   "drafts": dict, "sampled": list}, False),  # tensors: x (and q)
    "mp.prefix": ({"ops": list}, False),                        # a step's prefix ops, its rows all dropped
    "mp.forget": ({"keys": list}, False),                       # to stage 0: blocks a stage could not store
    # to stage 0: a step's tokens (-1: chunk; a speculating request's last), kept[req]: its proposals kept
    "mp.step": ({"reqs": list, "tokens": list, "ended": list, "kept": dict}, False),
    "mp.done": ({"ended": list}, False),                        # [req, reason] pairs: free their caches
    # to a head: a request's tokens from `index` on, each made `ages[i]` seconds before this was sent
    # drafted / accepted: its speculative decoding totals so far (speculate.py; 0 without)
    "mp.token": ({"req": str, "tokens": list, "index": int, "ages": list, "done": bool, "reason": str,
                  "drafted": int, "accepted": int}, False),
    "mp.cancel": ({"req": str}, False),
    "mp.error": ({"req": str, "message": str}, False),
    "mp.lost": ({"stage": str, "message": str}, False),          # to heads: a stage lost its neighbour
    "mp.shutdown": ({}, False),
}

for _kind, (_fields, _finite) in KINDS.items():
    wire.register_kind(_kind, {**_COMMON, **_fields}, finite=_finite)


def encode(kind: str, fields: dict, tensors: dict[str, np.ndarray] | None) -> list:
    return wire.encode(kind, fields, tensors)


def decode(frames: list, max_bytes: int) -> tuple[str, dict, dict]:
    """Validate and decode (raises wire.WireError on anything malformed or not a pipeline kind)."""
    msg = wire.decode(frames, max_bytes=max_bytes)
    if msg.kind not in KINDS:
        raise wire.WireError("unknown_kind", f"{msg.kind!r} is not a pipeline message")
    # numpy has no bfloat16: such a tensor is handed over as torch (a zero-copy view of the frame).
    tensors = {k: msg.tensor(k) if msg.dtypes.get(k) == "bfloat16" else v for k, v in msg.tensors.items()}
    return msg.kind, msg.fields, tensors
