"""The ring's membership agreement (algorithms/membership.py) on real RingLinks, one thread per rank: who is in each
epoch, from which step, who catches up from whom, who is refused. (The processes' elastic runs: test_allreduce.py,
test_diloco.py.)"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from smolcluster.algorithms.membership import Agreement, Decision
from smolcluster.errors import PeerError
from smolcluster.pipeline.launch import free_ports
from smolcluster.transport.ring import RingLink

TIMEOUT_S = 60


def on_threads(ranks: dict, slots: int, after: dict | None = None) -> dict:
    """Run ``ranks[r](link, agreement)`` for each rank r on a thread with its own RingLink over ``slots`` slots
    (rank r's started once the event ``after[r]`` is set); returns each one's result, or the exception it raised."""
    base = free_ports("127.0.0.1", slots)
    addrs = [f"tcp://127.0.0.1:{base + r}" for r in range(slots)]
    out = {}

    def one(rank, fn):
        if rank in (after or {}):
            wait_for(f"rank {rank}'s start", after[rank].is_set)
        link = RingLink(rank, addrs, addrs[rank], max_bytes=1 << 24, heartbeat_s=0.1, liveness_s=1.0)
        try:
            out[rank] = fn(link, Agreement(link))
        except Exception as e:  # the test asserts on it
            out[rank] = e
        finally:
            link.stopped.set()
            link.close(linger_s=1.0)

    threads = [threading.Thread(target=one, args=(r, fn), daemon=True) for r, fn in ranks.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT_S)
    assert not any(t.is_alive() for t in threads), f"a rank did not finish within {TIMEOUT_S}s: {out}"
    return out


def wait_for(what: str, done) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_joiner_is_noticed_decided_in_behind_and_catches_up_then_a_silent_member_is_dropped():
    """Ranks 0 and 1 form a ring, run it until both know that rank 2 asks to join (a flag summed on the ring, as
    the workers' stats table does), then re-form from step 7 with rank 2 behind; rank 2 takes the source's
    state; the three sum on the new epoch; rank 2 goes silent and the other two re-form without it."""
    # summed: all three have their sum before anyone re-forms (a member that re-forms tells the others it left
    # the epoch, which breaks a collective still waiting for its last hop)
    formed, summed = threading.Event(), threading.Barrier(3, timeout=TIMEOUT_S)

    def member(link, agreement):
        first = agreement.reform(0, "model", TIMEOUT_S, min_members=2)
        formed.set()
        while True:  # every member reads the same sum, so both re-form after the same collective
            flag = torch.tensor([float(bool(agreement.joiners))])
            link.allreduce(flag)
            if flag.item():
                break
        joined = agreement.reform(7, "model", TIMEOUT_S)
        agreement.catch_up(joined, lambda: ({"w": torch.arange(5.0)}, {"samples": 42}))
        x = torch.full((7,), float(link.rank + 1))
        link.allreduce(x)
        summed.wait()
        left = agreement.reform(8, "model", TIMEOUT_S)
        return first, joined, x, left

    def joiner(link, agreement):  # started once ranks 0 and 1 formed their ring
        joined = agreement.reform(0, "model", TIMEOUT_S)
        msg, run = agreement.catch_up(joined, lambda: pytest.fail("a rank behind sends no state"))
        x = torch.full((7,), 3.0)
        link.allreduce(x)
        summed.wait()
        return joined, msg.tensor("w", copy=True), run, x

    out = on_threads({0: member, 1: member, 2: joiner}, 3, after={2: formed})
    assert not [e for e in out.values() if isinstance(e, Exception)], out
    first, joined, _, left = out[0]
    assert first == Decision(epoch=0, step=0, source=0, members=[0, 1], sessions=first.sessions, behind=[])
    assert joined.epoch == 1 and joined.step == 7 and joined.members == [0, 1, 2]
    assert joined.source == 0 and joined.behind == [2]
    assert out[1][1] == joined and out[2][0] == joined  # the coordinator's decision is everyone's
    assert torch.equal(out[2][1], torch.arange(5.0)) and out[2][2] == {"samples": 42}
    for r in range(3):  # 1 + 2 + 3 on the three members of epoch 1
        assert torch.equal(out[r][2] if r < 2 else out[r][3], torch.full((7,), 6.0))
    assert left.epoch == 2 and left.members == [0, 1] and left.behind == [] and out[1][3] == left


def test_a_rank_with_another_model_is_refused_and_the_others_form_without_it():
    def rank0(link, agreement):
        return agreement.reform(0, "model-a", TIMEOUT_S)

    def rank1(link, agreement):
        return agreement.reform(0, "model-b", TIMEOUT_S)

    out = on_threads({0: rank0, 1: rank1}, 2)
    assert isinstance(out[1], PeerError), out
    assert "refused by rank 0: model fingerprint model-b" in str(out[1])
    assert "every rank must use the same model config" in str(out[1])
    assert isinstance(out[0], Decision) and out[0].members == [0], out
