"""Weights that travel: the head sends each stage exactly the tensors it holds, into its agent's cache.

For ``infer`` / ``chat`` with ``cluster=auto`` (coordinator.py), between reserving the stages' ports and
starting them:

1. plan     each stage's tensors, from the same partition its stage will compute (placement by memory, the
            stage's blocks, embedding and head); each tensor becomes a cache entry: a one-tensor safetensors
            file (its header written here + the tensor's bytes, read by byte range from the model's own file),
            named by its sha256. ``config.json`` travels with every stage, the tokenizer's files with stage 0,
            each LoRA adapter's two files (``adapters=``) with every stage.
2. ask      each agent what of its entries it already holds (it re-hashes them: weightcache.py), its free
            disk, and whether it can read this very model directory itself (``cluster.weights=auto``: the
            same paths, sizes and sha256; then nothing is sent, and the stage reads the directory as it
            always did). The agent first prunes other models' entries, least recently used first, to make
            room (weightcache.py). A node whose disk is still too small is refused in one line here, before
            anything is sent to any node.
3. stream   what is missing, in chunks of protocol.CHUNK bytes with WINDOW chunks in flight per agent, to
            every agent at once over its encrypted control channel; an entry that arrives corrupt is sent
            again; a half-sent entry is resumed from where it stopped. A tqdm bar shows MB/s and time left.
4. start    each stage with a ``model`` manifest: its agent builds the stage's model directory (links into
            the cache and an index), and the stage reads it as any Hugging Face directory.

The safetensors headers are read by :func:`~smolcluster.pipeline.weights.read_header` (a few lines of JSON):
the ``safetensors`` library's ``safe_open`` hands out tensors, not the byte offsets a range read needs.
A tensor's sha256 is remembered per (file, size, mtime) in ``STATE/coordinator/weight-hashes.json``, so a
second run neither re-reads the model to hash it nor sends a byte.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from smolcluster.errors import ConfigError, PeerError
from smolcluster.inference.placement import size as human
from smolcluster.node.protocol import CHUNK
from smolcluster.node.weightcache import ADAPTER_FILES, DISK_MARGIN

WINDOW = 16  # chunks in flight per agent: a LAN link stays full while a busy agent is slow to acknowledge
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


@dataclass
class Entry:
    """One cache entry: ``prefix`` (a one-tensor safetensors header, or a whole small file), then ``length``
    bytes of ``path`` from ``start``."""

    prefix: bytes
    path: Path | None = None
    start: int = 0
    length: int = 0
    sha: str = ""

    @property
    def size(self) -> int:
        return len(self.prefix) + self.length

    def read(self, offset: int, n: int, files: dict) -> bytes:
        out = self.prefix[offset:offset + n]
        if len(out) < n and self.path is not None:
            f = files.get(self.path) or files.setdefault(self.path, open(self.path, "rb", buffering=0))  # noqa: SIM115
            f.seek(self.start + max(0, offset - len(self.prefix)))
            out += f.read(min(n - len(out), self.size - offset - len(out)))
        return out


def say(line: str) -> None:
    """What the head did with the weights, whatever the log level (infer / chat log warnings only)."""
    print(line, file=sys.stderr, flush=True)


def tensor_entry(path: Path, key: str, info: dict, base: int) -> Entry:
    """The one-tensor safetensors file of ``key`` (header as the format writes it: JSON padded to 8 bytes)."""
    start, end = info["data_offsets"]
    header = json.dumps({key: {"dtype": info["dtype"], "shape": info["shape"], "data_offsets": [0, end - start]}},
                        separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return Entry(struct.pack("<Q", len(header)) + header, path, base + start, end - start)


class HashBook:
    """sha256 of entries by where their bytes come from, kept across runs (a second run reads nothing)."""

    def __init__(self, file: Path):
        self.file = file
        try:
            self.known = json.loads(file.read_text()) if file.is_file() else {}
        except ValueError:
            self.known = {}

    def fill(self, e: Entry) -> None:
        st = e.path.stat() if e.path is not None else None
        where = f"{e.path}|{st.st_size}|{st.st_mtime_ns}|{e.start}|" if st else ""
        mark = where + hashlib.sha256(e.prefix).hexdigest()
        if mark in self.known:
            e.sha = self.known[mark]
            return
        h, files = hashlib.sha256(), {}
        for offset in range(0, e.size, CHUNK):
            h.update(e.read(offset, min(CHUNK, e.size - offset), files))
        for f in files.values():
            f.close()
        e.sha = self.known[mark] = h.hexdigest()

    def save(self) -> None:
        tmp = self.file.with_name(f".{self.file.name}.{os.getpid()}")
        tmp.write_text(json.dumps(self.known))
        tmp.replace(self.file)  # (two heads at once: each writes whole, the last one wins)


@dataclass
class StagePlan:
    tensors: dict[str, Entry]                                 # tensor key -> its entry
    config_files: dict[str, Entry] = field(default_factory=dict)
    adapters: dict[str, dict[str, Entry]] = field(default_factory=dict)  # LoRA name -> its files (every stage)

    def entries(self) -> list[Entry]:
        return [*self.config_files.values(), *self.tensors.values(),
                *(e for files in self.adapters.values() for e in files.values())]

    def manifest(self) -> dict:
        return {"config_files": {n: e.sha for n, e in self.config_files.items()},
                "tensors": {k: e.sha for k, e in self.tensors.items()},
                "adapters": {a: {n: e.sha for n, e in files.items()} for a, files in self.adapters.items()}}


def plan_stages(p, info: dict, node_entries: list[dict], book: HashBook) -> list[StagePlan]:
    """Each stage's entries, from the partition its stage computes from the same settings (from_config)."""
    from dataclasses import replace

    from smolcluster.inference.adapters import check_adapters
    from smolcluster.inference.from_config import stage_formats, stage_weights_for
    from smolcluster.inference.settings import HeadPlace
    from smolcluster.pipeline.architectures import family_for
    from smolcluster.pipeline.weights import read_header, stage_keys, tensor_files

    q = replace(p, links=replace(p.links, nodes=node_entries))
    weights = stage_weights_for(q, info, stage_formats(q), local=False)
    arch, files = family_for(info["config"]), tensor_files(Path(info["weights"]))
    headers = {path: read_header(path) for path in set(files.values())}
    head_rank = 0 if p.head is HeadPlace.first else p.stages - 1
    src = Path(info["weights"])
    config = src / "config.json" if src.is_dir() and (src / "config.json").is_file() else None
    common = {"config.json": Entry(config.read_bytes() if config else json.dumps(info["config"]).encode())}
    tok_dir = Path(info["tokenizer"]).parent if info.get("tokenizer") else None
    # every stage applies each adapter to its own blocks: the adapter's two small files travel whole to each
    check_adapters(p.adapters, info["config"])  # (a misfit or missing adapter: one line before anything is read)
    adapters = {name: {f: Entry((Path(d) / f).read_bytes()) for f in ADAPTER_FILES} for name, d in (p.adapters or {}).items()}
    plans = []
    for r, s in enumerate(arch.plan(p.stages, weights, head_first=p.head is HeadPlace.first)):
        keys = stage_keys(src, files, arch.param_shapes(s.first, r == head_rank, s.blocks))
        tensors = {}
        for key in keys.values():
            header, base = headers[files[key]]
            tensors[key] = tensor_entry(files[key], key, header[key], base)
        extra = {n: Entry((tok_dir / n).read_bytes()) for n in TOKENIZER_FILES
                 if r == 0 and tok_dir is not None and (tok_dir / n).is_file()}
        plans.append(StagePlan(tensors, {**common, **extra}, adapters))
    for e in (e for plan in plans for e in plan.entries()):
        book.fill(e)
    book.save()
    return plans


def model_files(info: dict, book: HashBook, adapters: dict | None = None) -> dict[str, list]:
    """The head's model (and LoRA adapters') files, {absolute path: [size, sha256]}: an agent that reads the same
    is sent nothing."""
    from smolcluster.pipeline.weights import INDEX, tensor_files

    src = Path(info["weights"]).resolve()
    paths = {Path(x).resolve() for x in tensor_files(src).values()}
    paths |= {src / n for n in ("config.json", INDEX) if src.is_dir()}
    paths |= {(Path(d) / f).resolve() for d in (adapters or {}).values() for f in ADAPTER_FILES}
    out = {}
    for x in sorted(x for x in paths if x.is_file()):
        whole = Entry(b"", x, 0, x.stat().st_size)
        book.fill(whole)
        out[str(x)] = [whole.size, whole.sha]
    book.save()
    return out


@dataclass
class Transfer:
    """What one agent is sent: its stages' missing entries, from where each stopped."""

    link: object                                   # coordinator.AgentLink
    todo: list[tuple[Entry, int]]                  # (entry, next offset to send), in order
    entries: dict[str, Entry] = field(default_factory=dict)
    in_flight: int = 0
    sent: int = 0
    retries: dict[str, int] = field(default_factory=dict)
    last_ack: float = field(default_factory=time.monotonic)
    stages: str = ""                               # the stages this agent runs ("0", "0,2"; replicas: "r1 0")

    def show(self, progress) -> None:
        """This transfer's figures to ``progress`` (telemetry/weights.WeightsMetrics, or None: nobody watches)."""
        if progress is not None:
            progress.show(self.stages, self.link.node.where(), sum(e.size for e in self.entries.values()),
                          self.need, self.sent)

    need: int = 0                                  # bytes to send (grows when a corrupt entry is sent again)

    def __post_init__(self) -> None:
        self.need = sum(e.size - off for e, off in self.todo)


def ask_all(asks: dict, heartbeat_s: float, timeout_s: float) -> dict[str, dict]:
    """``weights_ask`` to every agent at once (each re-hashes what it holds), beating the others meanwhile;
    ``{node name: its weights_status fields}``."""
    for link, entries, files in asks.values():
        link.ep.send("weights_ask", {"entries": {sha: e.size for sha, e in entries.items()}, "files": files})
    answers, deadline, beat = {}, time.monotonic() + timeout_s, time.monotonic()
    while len(answers) < len(asks):
        for name, (link, _, _) in asks.items():
            while name not in answers and (msg := link.ep.recv(0)) is not None:
                link.last_seen = time.monotonic()
                if msg.kind == "refuse":
                    raise ConfigError(f"node {link.node.where()} refused: {msg.fields['reason']}")
                if msg.kind == "node_bye":  # shutting down: no answer will come
                    raise PeerError(f"node {link.node.where()} left while saying what weights it holds: "
                                    f"{msg.fields['reason']}")
                if msg.kind == "weights_status":
                    answers[name] = msg.fields
        now = time.monotonic()
        if now > deadline:
            late = ", ".join(link.node.where() for n, (link, _, _) in asks.items() if n not in answers)
            raise PeerError(f"node {late} did not say what weights it holds within {timeout_s:g}s")
        if now - beat > heartbeat_s:
            for link, _, _ in asks.values():
                link.ep.send("status", {})
            beat = now
        time.sleep(0.01)
    return answers


def prepare(links: dict, ranks: list, plans: list[StagePlan], files: dict[str, list],
            heartbeat_s: float = 1.0, timeout_s: float = 600.0, prefix: str = "") -> tuple[list[Transfer], list[bool]]:
    """Ask every stage's agent what it holds (``files``: the head's model files, for ``cluster.weights=auto``; {}
    to send regardless); refuse a node without the disk for the rest, before anything is sent.
    Returns (a transfer per agent that does not read the model files itself, its todo empty when its cache holds
    everything; per rank: whether it reads the model files itself). ``prefix``: before its stages' label (replicas)."""
    by_node: dict[str, dict[str, Entry]] = {}
    stages: dict[str, list[str]] = {}
    for rank, (node, plan) in enumerate(zip(ranks, plans, strict=True)):
        by_node.setdefault(node.name, {}).update((e.sha, e) for e in plan.entries())
        stages.setdefault(node.name, []).append(str(rank))
    status = ask_all({n: (links[n], entries, files) for n, entries in by_node.items()}, heartbeat_s, timeout_s)
    transfers = []
    for name, entries in by_node.items():
        todo = what_to_send(f"node {links[name].node.where()}", entries, status[name],
                            "free disk there (its agent's --state-dir) or leave the node out (cluster.peers)")
        if todo is not None:
            transfers.append(Transfer(links[name], todo, entries, stages=prefix + ",".join(stages[name])))
    return transfers, [status[x.name]["readable"] for x in ranks]


def what_to_send(where: str, entries: dict[str, Entry], st: dict, fix: str) -> list[tuple[Entry, int]] | None:
    """From a node's answer to an ask (``st``: weightcache.WeightCache.answer): None when it reads the model files
    itself, else each missing entry with the offset it resumes from; refuses in one line (``fix``: what to do)
    when the node's disk has no room for them."""
    if st["readable"]:
        say(f"weights: {where} reads the model files itself: nothing to send")
        return None
    have = {sha: int(st["have"].get(sha, 0)) for sha in entries}
    need = sum(e.size - have[sha] for sha, e in entries.items())
    if need + DISK_MARGIN > st["free"]:
        raise ConfigError(f"{where} has {human(st['free'])} free for its weight cache, its stages' weights need "
                          f"{human(need)} more: {fix}")
    todo = [(e, have[sha]) for sha, e in entries.items() if have[sha] < e.size]
    cached = sum(have.values())
    say(f"weights: {where} holds {human(cached)} of its {human(cached + need)} already; "
        f"{len(todo)} of {len(entries)} entries to send")
    return todo


def stream(transfers: list[Transfer], heartbeat_s: float, liveness_s: float, on_message=None, progress=None) -> int:
    """Send every transfer's chunks, WINDOW in flight per agent, all agents at once; returns the bytes sent.
    An agent that acknowledges nothing for ``liveness_s`` raises (never waits forever). ``progress``: a
    telemetry/weights.WeightsMetrics that each transfer's figures go to, per acknowledged chunk (``top``'s lines)."""
    files: dict = {}
    bar = progress_bar(sum(e.size - off for t in transfers for e, off in t.todo))
    beat, start = time.monotonic(), time.monotonic()
    for t in transfers:
        t.show(progress)
    try:
        while any(t.todo or t.in_flight for t in transfers):
            for t in transfers:
                _fill(t, files)
            moved = sum(_take_acks(t, bar, on_message, progress) for t in transfers)
            now = time.monotonic()
            if now - beat > heartbeat_s:  # agents whose transfer is done still hear from us (their roles wait)
                for t in transfers:
                    t.link.ep.send("status", {})
                beat = now
            for t in transfers:
                if t.in_flight and now - t.last_ack > liveness_s:
                    raise PeerError(f"node {t.link.node.where()} acknowledged no weights for {liveness_s:g}s: "
                                    "stopped sending")
            if not moved:  # nothing arrived: wait a little on one agent that owes acknowledgements
                waiting = next((t for t in transfers if t.in_flight), None)
                if waiting is not None and (msg := waiting.link.ep.recv(20)) is not None:
                    _ack(waiting, msg, bar, on_message, progress)
    finally:
        bar.close()
        for f in files.values():
            f.close()
    return sent_summary({t.link.node.where(): t.sent for t in transfers}, start)


def progress_bar(total: int):
    """The transfer's bar with MB/s and time left: only on a terminal (no \r frames in logs), none for 0 bytes."""
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="weights", file=sys.stderr,
                disable=True if total == 0 else None, mininterval=0.5)


def sent_summary(sent_to: dict[str, int], start: float) -> int:
    """Says what each destination was sent and the whole transfer's rate; returns the bytes sent in all."""
    sent, took = sum(sent_to.values()), time.monotonic() - start
    for where, n in sent_to.items():
        say(f"weights: sent {n} bytes to {where}")
    say(f"weights: sent {sent} bytes in all ({human(sent)} in {took:.1f}s, {sent / 2**20 / max(took, 1e-9):.1f} MB/s)")
    return sent


def resend_bad(entries: dict[str, Entry], retries: dict[str, int], f: dict, where: str, why: str) -> Entry:
    """After a ``bad`` answer ``f`` ({sha, offset, n}): the entry to send again from its start, when it arrived
    whole but corrupt, at most twice; else raises (``why``: what the receiver said, or where it says it)."""
    e = entries.get(f["sha"])
    if e is None or f["offset"] + f["n"] != e.size or retries.get(e.sha, 0) >= 2:
        raise PeerError(f"{where} could not store weights entry {str(f['sha'])[:12]}: {why}")
    retries[e.sha] = retries.get(e.sha, 0) + 1
    say(f"weights: entry {e.sha[:12]} arrived corrupt at {where}: sending it again")
    return e


def _fill(t: Transfer, files: dict) -> None:
    while t.todo and t.in_flight < WINDOW:
        e, offset = t.todo[0]
        n = min(CHUNK, e.size - offset)
        data = e.read(offset, n, files)
        if len(data) != n:
            raise ConfigError(f"{e.path} changed while its weights were sent (short read): run again")
        t.link.ep.send("weights_chunk", {"sha": e.sha, "size": e.size, "offset": offset},
                       tensors={"data": np.frombuffer(data, np.uint8)})
        t.in_flight += 1
        if offset + n < e.size:
            t.todo[0] = (e, offset + n)
        else:
            t.todo.pop(0)


def _take_acks(t: Transfer, bar, on_message, progress) -> int:
    n = 0
    while (msg := t.link.ep.recv(0)) is not None:
        n += _ack(t, msg, bar, on_message, progress)
    return n


def _ack(t: Transfer, msg, bar, on_message, progress=None) -> int:
    t.link.last_seen = time.monotonic()
    if msg.kind != "weights_ack":
        if on_message is not None:
            on_message(t.link, msg)
        return 0
    f = msg.fields
    t.in_flight -= 1
    t.last_ack = time.monotonic()
    if f["state"] == "bad":
        e = resend_bad(t.entries, t.retries, f, f"node {t.link.node.where()}", "its log says why")
        t.todo.append((e, 0))
        t.need += e.size  # (top's line: the bytes to send grow by the entry sent again)
    t.sent += f["n"]
    bar.update(f["n"])
    t.show(progress)
    return 1
