"""The point-in-time window: which times a restore can reach by replaying capture.

Each epoch reaches from its base's snapshot time to its progress (`verified_at`). Two
epochs in a row join when the later one's base was taken at or before the earlier one
reached (a rebase hands over without a gap); otherwise the times between are a gap,
which restores refuse, naming both sides (pointintime.covering).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from ..manifest import parse_time
from ..store import Store
from .state import CaptureState, Progress, epochs, read_progress


@dataclass(frozen=True)
class Span:
    start: datetime
    end: datetime


@dataclass(frozen=True)
class Gap:
    start: datetime
    end: datetime
    why: str


@dataclass(frozen=True)
class Window:
    """The times capture can give: from `earliest` to `latest`, except the gaps."""

    spans: list[Span] = field(default_factory=list)
    gaps: list[Gap] = field(default_factory=list)

    @property
    def earliest(self) -> datetime | None:
        return self.spans[0].start if self.spans else None

    @property
    def latest(self) -> datetime | None:
        return self.spans[-1].end if self.spans else None

    def as_dict(self) -> dict[str, object]:
        return {"earliest": self.earliest.isoformat() if self.earliest else None,
                "latest": self.latest.isoformat() if self.latest else None,
                "gaps": [{"from": g.start.isoformat(), "to": g.end.isoformat(), "why": g.why}
                         for g in self.gaps]}


def window_of(history: list[tuple[CaptureState, Progress | None]]) -> Window:
    """The window of epochs (oldest first) and their progress records."""
    spans: list[Span] = []
    gaps: list[Gap] = []
    ended = ""
    for epoch, progress in history:
        start = parse_time(epoch.base_at)
        end = parse_time(progress.verified_at) if progress else start
        if spans and start <= spans[-1].end:
            spans[-1] = Span(spans[-1].start, max(spans[-1].end, end))
        else:
            if spans:
                gaps.append(Gap(spans[-1].end, start, ended or "a new epoch began"))
            spans.append(Span(start, max(start, end)))
        ended = progress.ended if progress else ""
    return Window(spans, gaps)


def window(store: Store, database_id: str) -> Window:
    """The window as the store records it now."""
    return window_of([(e, read_progress(store, database_id, e))
                      for e in epochs(store, database_id)])
