"""Pipeline slots handed out fairly: round-robin over users, first come first served within a user.

The pipeline interleaves the requests in flight one step at a time, so every active
request slows the others a little; past a few per stage, more only adds latency. A
:class:`FairQueue` keeps at most ``slots`` requests in the pipeline and makes the rest
wait. Waiting requests are grouped by user (a browser session, or the API client's
address: never the body's ``user`` field, which a client could rename at will). A free slot goes to the waiting user with the fewest requests
running, then to the one served least recently, then to the one who came first; so
one user who sends ten requests delays another user's single request by at most one
of them, not ten.
"""

from __future__ import annotations

import itertools
import threading
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field

from smolcluster.errors import SmolclusterError


class QueueFull(SmolclusterError):
    """Too many requests are waiting: the caller should retry later."""


@dataclass(eq=False)
class Ticket:
    user: str
    number: int
    granted: bool = False  # holds a slot (until it leaves)
    left: bool = False     # gave its slot back, or stopped waiting
    wake: threading.Event = field(default_factory=threading.Event)  # set on grant or on leave


class FairQueue:
    def __init__(self, slots: int, max_waiting: int = 64):
        if slots < 1:
            raise ValueError(f"slots={slots}: at least one request must be able to run")
        self.slots, self.max_waiting = slots, max_waiting
        self._lock = threading.Lock()
        self._active: set[Ticket] = set()
        self._waiting: OrderedDict[str, deque[Ticket]] = OrderedDict()  # users in the order they came
        self._running: Counter[str] = Counter()  # slots held, per user
        self._last_grant: dict[str, int] = {}    # when each user was last given a slot (grant number)
        self._numbers = itertools.count()
        self._n_grants = 0

    def join(self, user: str) -> Ticket:
        """Queue a request of ``user``; it may be granted a slot at once (``ticket.granted``)."""
        with self._lock:
            if self._n_waiting() >= self.max_waiting and len(self._active) >= self.slots:
                raise QueueFull(f"{self.max_waiting} requests are already waiting: retry in a moment "
                                "(serve.max_waiting raises the limit)")
            ticket = Ticket(user, next(self._numbers))
            self._waiting.setdefault(user, deque()).append(ticket)
            self._grant()
        return ticket

    def wait(self, ticket: Ticket, timeout: float) -> bool:
        """True once waiting is over: the ticket holds a slot, or it left (waits at most ``timeout`` s)."""
        return ticket.wake.wait(timeout)

    def leave(self, ticket: Ticket) -> None:
        """Give the slot back (or stop waiting for one). Safe to call twice."""
        with self._lock:
            if ticket.left:
                return
            ticket.left = True
            ticket.wake.set()
            if ticket in self._active:
                self._active.discard(ticket)
                self._running[ticket.user] -= 1
                if not self._running[ticket.user]:
                    del self._running[ticket.user]
            else:
                q = self._waiting.get(ticket.user)
                if q is not None and ticket in q:
                    q.remove(ticket)
                    if not q:
                        del self._waiting[ticket.user]
            if ticket.user not in self._running and ticket.user not in self._waiting:
                self._last_grant.pop(ticket.user, None)  # gone quiet: comes back as a new user
            self._grant()

    def position(self, ticket: Ticket) -> int:
        """How many waiting requests will get a slot before this one (0 = next; also 0 once granted)."""
        with self._lock:
            if ticket.granted or ticket.left:
                return 0
            return self._grant_order().index(ticket)

    def stats(self) -> dict:
        with self._lock:
            return {"slots": self.slots, "active": len(self._active), "waiting": self._n_waiting(),
                    "waiting_users": len(self._waiting)}

    # -- under the lock ---------------------------------------------------------------------------
    def _n_waiting(self) -> int:
        return sum(len(q) for q in self._waiting.values())

    @staticmethod
    def _pick(waiting, running: Counter, last_grant: dict) -> str:
        """The waiting user to serve next: fewest running, then least recently served, then first come."""
        rank = {u: i for i, u in enumerate(waiting)}
        return min(rank, key=lambda u: (running[u], last_grant.get(u, -1), rank[u]))

    def _grant(self) -> None:
        while len(self._active) < self.slots and self._waiting:
            user = self._pick(self._waiting, self._running, self._last_grant)
            q = self._waiting[user]
            ticket = q.popleft()
            if not q:
                del self._waiting[user]
            self._active.add(ticket)
            self._running[user] += 1
            self._last_grant[user] = self._n_grants
            self._n_grants += 1
            ticket.granted = True
            ticket.wake.set()

    def _grant_order(self) -> list[Ticket]:
        """The order in which the waiting tickets would be granted if nothing finished meanwhile."""
        waiting = OrderedDict((u, deque(q)) for u, q in self._waiting.items())
        running, last_grant = Counter(self._running), dict(self._last_grant)
        order: list[Ticket] = []
        while waiting:
            user = self._pick(waiting, running, last_grant)
            order.append(waiting[user].popleft())
            if not waiting[user]:
                del waiting[user]
            running[user] += 1
            last_grant[user] = self._n_grants + len(order)
        return order
