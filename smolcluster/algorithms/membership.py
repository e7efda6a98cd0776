"""Who is in the ring (``algo=allreduce``, ``algo=diloco``): the live ranks agree on each epoch of it.

    Agreement.reform(step, ...)     agree with every live rank on the next epoch: a Decision (members, step, source)
    Agreement.catch_up(decision)    the source's training state to the members that are behind
    check_quorum                    only the side of a cut ring that holds a majority goes on
    Membership                      who was in the ring when, per worker (events, steps, staleness)

The ring itself (:class:`~smolcluster.transport.ring.RingLink`) moves bytes; this module decides on its control
messages. A rank that finds a member silent, or hears that a member left or restarted, gets a ``RingBroken`` from
the link; every member then calls :meth:`Agreement.reform`:

1. it tells the members of its epoch that it left (``ring_reform``), so nobody waits
   on it for the liveness window;
2. it sends a report (rank, session, epoch, last completed step) to the
   coordinator, the lowest rank it hears heartbeats from (again whenever that
   changes: a dead coordinator is replaced within the liveness window);
3. the coordinator waits until it holds a report from every slot it hears
   heartbeats from, drops the silent ones, and decides: members = the reporters,
   step = the highest completed step among them, source = the lowest member at that
   step, epoch = the highest reported epoch + 1; it sends that decision to each
   member, and the decision is the agreement (nobody else decides anything).
4. every member at a lower step (mid-step when the ring broke, or a new rank)
   receives the source's weights and optimizer state (:meth:`Agreement.catch_up`)
   and everyone goes on from ``step``: a partial step is discarded everywhere.

New ranks join the same way: a rank starts with epoch -1 and sends its report to
every slot until a decision includes it; running members note the request
(:attr:`Agreement.joiners`) and re-form at the next step boundary (the caller decides
when). This assumes crash-stop failures on one network (a partition could elect two
coordinators: :func:`check_quorum` stops the minority side).
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import Callable

import torch
from loguru import logger

from smolcluster.errors import PeerError
from smolcluster.transport import wire
from smolcluster.transport.ring import RingLink

# "here I am at this step" (to the coordinator; a new rank to every slot), "I left epoch E", the coordinator's
# decision, a refusal
wire.register_kind("ring_report", {"rank": int, "session": str, "epoch": int, "step": int, "fingerprint": str,
                                   "protocol": int})
wire.register_kind("ring_reform", {"rank": int, "epoch": int})
wire.register_kind("ring_epoch", {"rank": int, "epoch": int, "step": int, "source": int, "members": list,
                                  "sessions": list, "behind": list})
wire.register_kind("ring_refused", {"rank": int, "reason": str})


@dataclasses.dataclass(frozen=True)
class Decision:
    """An epoch of the ring, as its coordinator decided it: everyone goes on from ``step``; the ``behind`` members
    take the state of that step from ``source``. ``sessions``: each member's process, in ``members``' order."""

    epoch: int
    step: int
    source: int
    members: list[int]
    sessions: list[str]
    behind: list[int]

    @classmethod
    def of(cls, fields: dict) -> Decision:
        return cls(**{f.name: fields[f.name] for f in dataclasses.fields(cls)})


class Agreement:
    """This rank's side of the membership protocol (the module docstring), on its link's control messages.
    Every method runs on the thread that owns the link (the ring's)."""

    def __init__(self, link: RingLink):
        self.link = link
        self.session = uuid.uuid4().hex[:12]  # this process: a restarted rank has another
        self.sessions: dict[int, str] = {}  # member -> its process's session, from the decision
        self.joiners: dict[int, dict] = {}  # slot -> report of a rank asking to join (the caller re-forms at a step boundary)
        self.born = time.monotonic()  # (with the link's heartbeats)
        link.on_control = self.noticed

    def noticed(self, msg: wire.Message) -> None:
        """A control message that came in while the ring runs: note a join, or raise RingBroken."""
        f, kind, link = msg.fields, msg.kind, self.link
        r = f["rank"]
        if kind == "ring_report":
            if self.sessions.get(r) == f["session"]:
                return  # a report of ours or of a joiner's that crossed the decision
            if r not in self.joiners:
                logger.info(f"ring rank {link.rank}: rank {r} asks to join (at the next step boundary)")
            self.joiners[r] = f
            if r in self.sessions:
                raise link.broken(f"ring rank {link.rank}: rank {r} restarted", {r})
        elif kind == "ring_reform" and f["epoch"] == link.epoch and r in self.sessions:
            raise link.broken(f"ring rank {link.rank}: rank {r} left the ring's epoch {link.epoch}")
        elif kind == "ring_refused":
            raise PeerError(f["reason"])
        elif kind == "ring_epoch" and f["epoch"] > link.epoch:
            raise link.broken(f"ring rank {link.rank}: rank {r} is in a newer epoch ({f['epoch']}) than ours")
        # anything else is from an older epoch: already dealt with

    def reform(self, step: int, fingerprint: str, timeout_s: float, min_members: int = 1) -> Decision:
        """Agree with every live rank on the next epoch and enter it; ``step`` is the last step this rank
        completed. Also the first forming of the ring: every rank starts here, and the coordinator waits for
        ``min_members`` ranks."""
        link = self.link
        link.leaving.clear()  # (on the ring's thread: every task queued before this one has run)
        if link.epoch >= 0:
            for r in link.members:
                if r != link.rank:
                    link.tell(r, "ring_reform", {"rank": link.rank, "epoch": link.epoch})
        mine = {"rank": link.rank, "session": self.session, "epoch": link.epoch, "step": step,
                "fingerprint": fingerprint, "protocol": wire.PROTOCOL_VERSION}
        reports, refused = {**self.joiners, link.rank: mine}, set()
        told, told_at, deadline = None, 0.0, time.monotonic() + timeout_s
        while True:
            alive = link.alive() - refused
            coord = min(alive)
            # a rank that has just started first listens a few beats long, so it knows every live slot before
            # it would coordinate (else two ranks starting apart could each form a ring of their own)
            settled = link.epoch >= 0 or time.monotonic() - self.born > 3 * link.heartbeat_s
            if coord == link.rank and settled and alive <= reports.keys() and len(alive) >= min_members:
                return self._decide({r: reports[r] for r in sorted(alive)})
            now = time.monotonic()
            if coord != link.rank and (told != coord or now - told_at > 1.0):
                # a new rank does not know who coordinates: it asks every slot (a running member notes a join)
                for r in [coord] if link.epoch >= 0 else [r for r in range(link.slots) if r != link.rank]:
                    link.tell(r, "ring_report", mine)
                told, told_at = coord, now
            if now > deadline:
                raise PeerError(f"ring rank {link.rank}: no ring formed within {timeout_s}s (heard from ranks "
                                f"{sorted(alive)}, reports from {sorted(reports)}, want {min_members}): start every "
                                "rank (role=worker rank=N) and check cluster.nodes hosts/ports")
            msg = link.next_control(0.1)
            decision = None if msg is None else self._heard(msg, fingerprint, reports, refused)
            if decision is not None:
                return decision

    def _heard(self, msg: wire.Message, fingerprint: str, reports: dict, refused: set) -> Decision | None:
        """A control message while re-forming: a report (kept, or refused: another model or protocol), the
        decision that includes us (entered and returned), a refusal of us."""
        f, link = msg.fields, self.link
        if msg.kind == "ring_report":
            if f["fingerprint"] == fingerprint and f["protocol"] == wire.PROTOCOL_VERSION:
                reports[f["rank"]] = f
                return None
            reason = (f"ring rank {f['rank']}: refused by rank {link.rank}: model fingerprint {f['fingerprint']} / "
                      f"protocol {f['protocol']} != ours {fingerprint} / {wire.PROTOCOL_VERSION}: every rank must "
                      "use the same model config")
            logger.error(reason)
            link.tell(f["rank"], "ring_refused", {"rank": link.rank, "reason": reason})
            refused.add(f["rank"])
        elif msg.kind == "ring_epoch" and f["epoch"] > link.epoch:
            if self.session not in f["sessions"] or f["members"][f["sessions"].index(self.session)] != link.rank:
                raise PeerError(f"ring rank {link.rank}: left out of epoch {f['epoch']} by rank {f['rank']} "
                                "(it did not hear from us in time)")
            return self._adopt(Decision.of(f))
        elif msg.kind == "ring_refused":
            raise PeerError(f["reason"])
        return None  # older epochs' reform notices: this reform covers them

    def _decide(self, reports: dict[int, dict]) -> Decision:
        """The coordinator's decision over the live ranks' reports; sent to every member."""
        members = sorted(reports)
        step = max(rep["step"] for rep in reports.values())
        decision = Decision(epoch=max(rep["epoch"] for rep in reports.values()) + 1, step=step,
                            source=min(r for r in members if reports[r]["step"] == step), members=members,
                            sessions=[reports[r]["session"] for r in members],
                            behind=[r for r in members if reports[r]["step"] != step])
        fields = {"rank": self.link.rank, **dataclasses.asdict(decision)}
        for r in members:
            if r != self.link.rank:
                self.link.tell(r, "ring_epoch", fields)
        return self._adopt(decision)

    def _adopt(self, d: Decision) -> Decision:
        self.link.enter(d.epoch, d.members)
        self.sessions = dict(zip(d.members, d.sessions))
        self.joiners = {r: f for r, f in self.joiners.items() if r not in self.sessions}
        return d

    def catch_up(self, d: Decision, state: Callable[[], tuple[dict[str, torch.Tensor], dict]]) -> tuple | None:
        """The source sends ``state()`` (tensors, and counters that go as JSON) of the decision's step to every
        member behind; a member behind returns what it received (the ``ring_state`` message, its counters);
        every other member None."""
        link = self.link
        if link.rank == d.source and d.behind:
            tensors, run = state()
            for r in d.behind:
                link.send_state(r, d.step, tensors, json.dumps(run))
        elif link.rank in d.behind:
            msg = link.recv_state(d.source)
            return msg, json.loads(msg.fields["run"])
        return None


def check_quorum(rank: int, old: list[int], new: list[int]) -> None:
    """A cut cable looks, from each side, exactly like the other side dying. Only the side that holds a majority of
    the last ring (or exactly half of it, including its lowest rank) goes on, so a partition cannot leave two rings
    training apart and writing the same run's files; the other side stops with this message. (The price: a 2-ring
    that loses rank 0 stops rather than going on alone; restart rank 0, or resume.)"""
    kept = set(old) & set(new)
    if not old or 2 * len(kept) > len(old) or (2 * len(kept) == len(old) and min(old) in kept):
        return
    raise PeerError(f"ring rank {rank}: only ranks {sorted(kept)} of the last ring {old} are reachable, not a "
                    f"majority: stopping so that one ring goes on, not two (check this node's network; restart it "
                    f"to join the ring again)")


class Membership:
    """Who was in the ring when, as every member sees it (decisions and the per-step table are the same on
    every member; a rank that joins gets the history in the source's state): per-worker steps and staleness."""

    def __init__(self, slots: int):
        self.workers = {r: {"joined_step": None, "left_step": None, "steps": 0, "staleness": {}} for r in range(slots)}
        self.events: list[dict] = []

    def members(self) -> list[int]:
        return [r for r, w in self.workers.items() if w["joined_step"] is not None and w["left_step"] is None]

    def change(self, step: int, epoch: int, old: list[int], new: list[int]) -> dict:
        joined, left = [r for r in new if r not in old], [r for r in old if r not in new]
        for r in joined:
            self.workers[r].update(joined_step=step, left_step=None)
        for r in left:
            self.workers[r]["left_step"] = step
        event = {"step": step, "epoch": epoch, "members": new, "joined": joined, "left": left}
        self.events.append(event)
        return event

    def stepped(self, members: list[int], staleness: list[int]) -> None:
        for r, k in zip(members, staleness):
            w = self.workers[r]
            w["steps"] += 1
            w["staleness"][str(k)] = w["staleness"].get(str(k), 0) + 1

    def summary(self) -> dict:
        out = {}
        for r, w in self.workers.items():
            n = sum(w["staleness"].values())
            mean = sum(int(k) * v for k, v in w["staleness"].items()) / n if n else None
            out[str(r)] = {**w, "staleness_mean": None if mean is None else round(mean, 4),
                           "staleness_max": max(map(int, w["staleness"]), default=None)}
        return out

    def to_json(self) -> dict:
        return {"workers": {str(r): w for r, w in self.workers.items()}, "events": self.events}

    def load(self, d: dict) -> None:
        self.workers = {int(r): w for r, w in d["workers"].items()}
        self.events = d["events"]
