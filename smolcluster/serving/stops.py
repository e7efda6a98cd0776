"""Stop sequences on streamed text: end an answer where a stop string begins, never show any of it.

Text arrives a token at a time, and a stop string may span tokens ("\\nUs" + "er:"), so
the matcher holds back the end of the text while it could still be the start of a stop
string, and lets it go as soon as it cannot.
"""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: list[str] | tuple[str, ...] = ()):
        self.stops = [s for s in stops if s]
        self.stopped = False
        self._held = ""  # text seen but not yet released

    def feed(self, piece: str) -> str:
        """Add streamed text; return what is now safe to show (may be "")."""
        if self.stopped:
            return ""
        text = self._held + piece
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self._held = True, ""
            return text[:cut]
        keep = self._longest_stop_prefix_suffix(text)
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        """The text held back, at the end of the stream (it did not become a stop string)."""
        out, self._held = self._held, ""
        return "" if self.stopped else out

    def _longest_stop_prefix_suffix(self, text: str) -> int:
        """Length of the longest end of ``text`` that is a proper prefix of some stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best


class LeadingSpaceTrimmer:
    """Drops whitespace before an answer's first visible character ("Assistant:" is followed by " Hi")."""

    def __init__(self):
        self.started = False

    def feed(self, piece: str) -> str:
        if self.started:
            return piece
        piece = piece.lstrip()
        self.started = bool(piece)
        return piece
