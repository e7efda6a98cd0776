"""``chat cluster=auto replicas=R``: a replica's stage that ends is started again on its agent, so the replica
comes back instead of staying down.

    restarts = Restarts(run, replicas)    # replicas: each replica's stage nodes (place_replicas)
    restarts.beat()                       # the coordinator's heartbeat thread: run.pump(), then tick()
    restarts.revive(r)                    # the head, before it reconnects replica r: waits for a restart under way

A stage whose process exits (killed, crashed, out of memory) is started again as it was started: on its node, on
its port (which its agent holds for it again), with its keys and the weights already in its agent's cache. The
replica's other stages keep running and know that address, so their links start afresh when it beats again
(pipeline/mesh.py); the head, which lost the replica, rebuilds it and routes to it again.

The restart waits until ``cluster.liveness_s`` has passed since the exit: by then the other stages and the head
have declared the stage lost (failing its requests, emptying the prefix caches, which must agree with the
restarted stage's empty one) rather than seeing it come back as if nothing had happened.

Bounded: a stage is started again at most ``RESTARTS`` times in a row (a restart that then serves ``STEADY_S``
starts the count afresh); a restart not running within ``cluster.connect_timeout_s`` (its agent refused it, e.g.
its weights cache pruned the stage's tensors, or never answered) counts as one that did not last (its role is failed
then; should the agent's ``running`` come after all, the stage is up: it holds its port). After that, or
when its node's agent is gone, the replica stays down with one error line saying why, its other stages are
stopped, and the head stops reconnecting it (:class:`~smolcluster.errors.ReplicaGone`). A stage is only restarted
on its own agent: moving it to another would change its address, which its replica's other stages hold.

Nothing here waits on an agent: ``tick`` runs on the heartbeat thread, which must keep every other agent's link
beating (a restart's port is asked for and its answer handled by the run's message loop: ``Run.restart``).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from loguru import logger

from smolcluster.errors import ConfigError, PeerError, ReplicaGone
from smolcluster.node.coordinator import FINAL, role_name

RESTARTS = 3      # a stage started again at most this many times in a row: no restart loop forever
STEADY_S = 60.0   # a restarted stage that has run this long counts as recovered: its count starts afresh


@dataclass
class _Stage:
    replica: int
    index: int
    name: str          # its role name on its agent, e.g. "r1 stage 0"
    node: str          # its agent's name (run.links' key)
    state: str = "up"  # up | waiting (ended, restarted once liveness_s has passed) | starting | gone
    ended_at: float = 0.0
    started_at: float = 0.0
    restarts: int = 0  # restarts in a row
    why: str = ""      # gone: the one line saying why the replica stays down


class Restarts:
    def __init__(self, run, replicas: list[list]):
        """``run``: the coordinator's :class:`~smolcluster.node.coordinator.Run` that started every replica's stages
        (role ``rR stage I`` on ``replicas[R][I]``)."""
        self.run = run
        self.stages = [_Stage(r, i, role_name("stage", i, r), node.name) for r, ranks in enumerate(replicas)
                       for i, node in enumerate(ranks)]
        self.changed = threading.Condition()
        self.closed = False
        now = time.monotonic()
        for st in self.stages:
            st.started_at = now

    def beat(self) -> None:
        """One round of the coordinator's heartbeat thread (which owns the agents' links): every agent's messages
        and heartbeat, then :meth:`tick`. A stage that could not start, or an agent that refused, is one error line
        (it downs one replica at most: the others serve on)."""
        try:
            self.run.pump()
        except Exception as e:  # (the heartbeat thread goes on whatever one message did)
            logger.error(str(e))
        self.tick()

    def tick(self) -> None:
        """Notice ended stages, start them again when due, give up when they will not stay up. Nothing once
        closed (:meth:`close`: the coordinator is stopping every stage)."""
        if self.closed:
            return
        for st in self.stages:
            try:
                self._tick(st)
            except (PeerError, ConfigError) as e:  # the agent refused or did not answer: that try failed
                self._ended(st, f"its restart failed: {e}")
            except Exception as e:  # a bug here: that replica stays down, the others' stages are still watched
                logger.opt(exception=e).error(f"replica {st.replica}: watching its stage {st.index} failed: {e!r}")
                self._lost(st, f"watching its stage {st.index} failed ({e!r}: a bug, its traceback is above)")

    def _tick(self, st: _Stage) -> None:
        if st.state == "gone":
            return
        link = self.run.links[st.node]
        where = f"node {link.node.where()}"
        if not link.alive:
            return self._give_up(st, f"{where} is gone with its stage {st.index}, and a stage is started again "
                                     "only on its own agent: start that agent again, then the chat")
        role = link.roles.get(st.name, {})
        state = role.get("state")
        if st.state in ("up", "starting") and state in FINAL:
            code = role.get("code")
            return self._ended(st, f"its stage {st.index} on {where} {state}"
                                   + (f" with code {code}" if code is not None else "")
                                   + (f" ({why})" if (why := role.get("detail") or role.get("error")) else ""))
        if st.state in ("starting", "waiting") and state in ("running", "listening"):
            # (waiting: its agent's `running` came after the deadline below: it runs, on its port, so it is up;
            # starting it again would find that port taken)
            self._set(st, "up")
            logger.info(f"replica {st.replica}'s stage {st.index} is running again on {where}")
        elif st.state == "starting" and time.monotonic() - st.started_at > self.run.c.connect_timeout_s:
            why = (f"its stage {st.index} on {where} did not start within cluster.connect_timeout_s="
                   f"{self.run.c.connect_timeout_s:g}s (its agent did not answer)")
            self.run.not_restarted(link, st.name, why)  # failed, not starting forever; a late reserved starts nothing
            self._ended(st, why)
        elif st.state == "waiting" and time.monotonic() - st.ended_at >= self.run.c.liveness_s:
            st.restarts += 1
            logger.warning(f"replica {st.replica}: starting its stage {st.index} again on {where} (restart "
                           f"{st.restarts} of at most {RESTARTS} in a row)")
            st.started_at = time.monotonic()
            self._set(st, "starting")
            self.run.restart(st.name)

    def _ended(self, st: _Stage, why: str) -> None:
        if st.state != "starting" and time.monotonic() - st.started_at >= STEADY_S:
            st.restarts = 0  # it served long enough: recovered (a restart that did not last keeps the count going)
        if st.restarts >= RESTARTS:
            return self._give_up(st, f"{why}; started again {st.restarts} times in a row, it did not stay up: not "
                                     "again (its log is above)")
        logger.error(f"replica {st.replica}: {why}; starting it again in {self.run.c.liveness_s:g}s "
                     "(cluster.liveness_s: once every peer has noticed)")
        st.ended_at = time.monotonic()
        self._set(st, "waiting")

    def _lost(self, st: _Stage, why: str) -> None:
        """:meth:`_give_up`, and if stopping the replica's stages fails too, they are marked gone all the same (a
        bug must not have the heartbeat thread try again every beat)."""
        try:
            self._give_up(st, why)
        except Exception as e:
            logger.error(f"replica {st.replica}: could not stop its stages: {e!r}")
            for other in (x for x in self.stages if x.replica == st.replica):
                other.why = other.why or f"replica {st.replica} stays down: {why}"
                self._set(other, "gone")

    def _give_up(self, st: _Stage, why: str) -> None:
        """The replica stays down: every stage of it gone, and stopped where its agent lives (no restart loop of
        the others, no stage left holding memory for a replica that will not serve)."""
        st.why = f"replica {st.replica} stays down: {why}"
        logger.error(st.why)
        for other in (x for x in self.stages if x.replica == st.replica):
            other.why = other.why or st.why
            if self.run.links[other.node].alive:  # (its process, or the port held for it)
                self.run.stop_role(other.name, st.why)
            self._set(other, "gone")

    def _set(self, st: _Stage, state: str) -> None:
        with self.changed:
            st.state = state
            self.changed.notify_all()

    def revive(self, r: int, timeout_s: float = 600.0) -> None:
        """Before the head reconnects replica ``r``: wait while one of its stages is being started again; raises
        :class:`ReplicaGone` (the one line why) when the replica stays down. (A stage not yet noticed as ended
        is the head's connect's to wait for: its stages' addresses are unchanged.)"""
        mine = [st for st in self.stages if st.replica == r]
        with self.changed:
            self.changed.wait_for(lambda: self.closed or all(st.state in ("up", "gone") for st in mine), timeout_s)
        gone = next((st for st in mine if st.state == "gone"), None)
        if gone is not None:
            raise ReplicaGone(gone.why)
        if self.closed:
            raise ReplicaGone(f"replica {r} stays down: the coordinator is stopping the stages")

    def close(self) -> None:
        """No more restarts (the coordinator stops every stage): a head waiting in :meth:`revive` is let go."""
        with self.changed:
            self.closed = True
            self.changed.notify_all()
