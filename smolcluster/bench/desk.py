"""An emulated desk of unlike machines on one Linux box: each node a network namespace on a shaped bridge
(:class:`smolcluster.testing.netns.Lan`) with a CPU budget of its own, a cgroup v1 ``cpu`` group whose CFS quota
(``cpu.cfs_quota_us`` per ``cpu.cfs_period_us``) is the node's share of a core. With budgets one node and N
nodes get the same compute per node, so a scaling ratio measures the algorithm, not the box's core count;
budgets in proportion (``--speeds 1,1,2,4``) emulate machines of unlike speed. Used by ``bench scaling``.

A command joins its node's group before it enters the namespace (:meth:`Desk.exec`'s prefix), so every process it
starts is in both. Needs root, iproute2, tc and a writable ``/sys/fs/cgroup/cpu``.
"""

from __future__ import annotations

import os
from pathlib import Path

from smolcluster.testing.netns import Lan

CGROUP_CPU = Path("/sys/fs/cgroup/cpu")
SHARES = 262_144  # cgroup v1's largest cpu.shares (see Desk.build)
PERIOD_US = 100_000  # the kernel's default CFS period: a budget of 0.45 core is 45 ms of CPU every 100 ms


def cgroup_unavailable() -> str | None:
    """Why CPU budgets cannot be set here (cgroup v1's cpu controller, writable); None when they can."""
    if not (CGROUP_CPU / "cpu.cfs_quota_us").is_file():
        return f"no cgroup v1 cpu controller at {CGROUP_CPU} (CPU budgets need cpu.cfs_quota_us)"
    if not os.access(CGROUP_CPU, os.W_OK):
        return f"{CGROUP_CPU} is not writable (needs root)"
    return None


class Desk(Lan):
    """A :class:`Lan` whose hosts in ``cpus`` (host -> cores, e.g. 0.45) run under that CPU budget."""

    def __init__(self, names: list[str], rate: str | None = None, cpus: dict[str, float] | None = None,
                 tag: str = "") -> None:
        super().__init__(names, rate, tag)
        self.cpus = dict(cpus or {})
        self.groups = {h: CGROUP_CPU / f"{self.ns[h]}" for h in self.cpus}

    def build(self) -> Desk:
        super().build()
        try:
            for host, cores in self.cpus.items():
                group = self.groups[host]
                group.mkdir(exist_ok=True)
                (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
                (group / "cpu.cfs_quota_us").write_text(str(max(1000, int(cores * PERIOD_US))))  # >= 1 ms
                # the quota is a ceiling, not a guarantee: under contention CFS splits the CPU by weight, and a group
                # of the default weight (1024) is one entity against every busy process of the root group, so other
                # load on the box would push a node below its budget. The highest weight (262144) makes the node
                # win any contention up to its quota, which still caps it: the budget holds both ways.
                (group / "cpu.shares").write_text(str(SHARES))
        except BaseException:
            self.close()
            raise
        return self

    def quota(self, host: str) -> float | None:
        """The cores ``host`` may use, as the kernel holds it (None: no budget)."""
        group = self.groups.get(host)
        if group is None:
            return None
        return int((group / "cpu.cfs_quota_us").read_text()) / int((group / "cpu.cfs_period_us").read_text())

    def exec(self, host: str) -> list[str]:
        """The prefix that runs a command in ``host``'s CPU group (if it has a budget) and namespace."""
        prefix = super().exec(host)
        if host not in self.groups:
            return prefix
        # the shell moves itself into the group, then becomes the command: its children inherit both
        return ["sh", "-c", 'echo $$ > "$1" && shift && exec "$@"', "desk",
                str(self.groups[host] / "cgroup.procs"), *prefix]

    def close(self) -> None:
        super().close()
        for group in self.groups.values():
            try:
                group.rmdir()  # (a group with processes left cannot go: they were the caller's to stop)
            except OSError:
                pass
