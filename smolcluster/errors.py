"""User-facing errors: each names the problem and the fix in one line.

Entry points catch :class:`SmolclusterError` and print ``error: <message>``
instead of a traceback; anything else is a bug and keeps its traceback.
"""


class SmolclusterError(Exception):
    """An error caused by input the user can fix (config, files, peers)."""


class ConfigError(SmolclusterError):
    """A config value is wrong: the message names the key and a valid value."""


class DataError(SmolclusterError):
    """A data file is missing, truncated or malformed: the message names the file."""


class PeerError(SmolclusterError):
    """A peer refused us, vanished, or could not be reached in time."""


class ReplicaGone(PeerError):
    """A lost replica that will not be started again (its node is gone, or it kept failing): it stays down."""
