"""Node agents: a cluster that forms itself on the LAN, safely.

    python -m smolcluster.node                 # on every machine: the agent (advertises itself by mDNS)
    python -m smolcluster.node pair 123456     # on a machine, once: confirm the code a coordinator shows
    python -m smolcluster.train cluster=auto   # on any machine: discover, pair, place roles, run

    pairing      identities (CURVE key pairs), fingerprints, the 6-digit pairing code, the allowlist
    protocol     the control messages (kinds on the validated wire format; never pickle)
    discovery    DNS-SD/mDNS advertisement and browsing (python-zeroconf), static peers
    agent        the long-running agent: starts/stops ``smolcluster.train`` roles for a paired coordinator
    coordinator  ``cluster=auto``: discovery, pairing, placement, the run through the agents
"""
