"""The point-in-time window: which times a restore can reach by replaying capture.

Each epoch reaches from its base's snapshot time to its progress (`verified_at`). Two
epochs in a row join when the later one's base was taken at or before the earlier one
reached (a rebase hands over without a gap); otherwise the times between are a gap,
which restores refuse, naming both sides (pointintime.covering).

Retention keeps every base the last `keep_days` days need (retention.capture_needs) and
lets older ones go; lifecycle then deletes them. An epoch whose base is gone reaches no
time any more: the window leaves it out, so it starts at the oldest epoch whose base is
still stored. Given `keep_days` and `now`, the window also says where the promised
window starts (`promised_from`, now - keep_days): retention holds what reaches back to
there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from ..manifest import parse_time
from ..store import MANIFEST, Store
from .state import CaptureState, Progress, epochs, read_progress

History = list[tuple[CaptureState, Progress | None]]


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
    """The times capture can give: from `earliest` to `latest`, except the gaps; and,
    when asked with a number of days to keep, where the promise starts."""

    spans: list[Span] = field(default_factory=list)
    gaps: list[Gap] = field(default_factory=list)
    promised_from: datetime | None = None  # now - keep_days (None: not asked)
    keep_days: int | None = None

    @property
    def earliest(self) -> datetime | None:
        return self.spans[0].start if self.spans else None

    @property
    def latest(self) -> datetime | None:
        return self.spans[-1].end if self.spans else None

    def reaches(self, when: datetime) -> bool:
        """Whether `when` is in a span (a time capture can give exactly)."""
        return any(s.start <= when <= s.end for s in self.spans)

    def describe(self) -> str:
        """"from A to B", or what says it reaches nothing."""
        if self.earliest is None or self.latest is None:
            return "no time (no epoch's base backup is stored)"
        return f"from {self.earliest.isoformat()} to {self.latest.isoformat()}"

    def as_dict(self) -> dict[str, object]:
        return {"earliest": self.earliest.isoformat() if self.earliest else None,
                "latest": self.latest.isoformat() if self.latest else None,
                "gaps": [{"from": g.start.isoformat(), "to": g.end.isoformat(), "why": g.why}
                         for g in self.gaps],
                "keep_days": self.keep_days,
                "promised_from": self.promised_from.isoformat() if self.promised_from else None}


def window_of(history: History, gone: frozenset[str] | set[str] = frozenset(),
              keep_days: int | None = None, now: datetime | None = None) -> Window:
    """The window of epochs (oldest first) and their progress records. Epochs whose base
    backup is in `gone` reach nothing: left out (one between two others leaves a gap
    that names it)."""
    spans: list[Span] = []
    gaps: list[Gap] = []
    ended = ""
    for epoch, progress in history:
        if epoch.base in gone:
            ended = f"the base backup {epoch.base} is gone" if spans else ""
            continue
        start = parse_time(epoch.base_at)
        end = parse_time(progress.verified_at) if progress else start
        if spans and start <= spans[-1].end:
            spans[-1] = Span(spans[-1].start, max(spans[-1].end, end))
        else:
            if spans:
                gaps.append(Gap(spans[-1].end, start, ended or "a new epoch began"))
            spans.append(Span(start, max(start, end)))
        ended = progress.ended if progress else ""
    promised = (now - timedelta(days=keep_days)
                if keep_days is not None and now is not None else None)
    return Window(spans, gaps, promised, keep_days if promised is not None else None)


def stored_backups(store: Store, database_id: str) -> set[str]:
    """The ids of the backups whose manifest is stored (a listing: no manifest is read)."""
    return {key.removesuffix("/" + MANIFEST).rsplit("/", 1)[-1]
            for key in store.manifest_keys(database_id)}


def gone_bases(store: Store, database_id: str, history: History) -> set[str]:
    """The bases of `history` whose backup is no longer stored."""
    bases = {epoch.base for epoch, _ in history}
    return bases - stored_backups(store, database_id) if bases else set()


def window(store: Store, database_id: str, keep_days: int | None = None,
           now: datetime | None = None, history: History | None = None) -> Window:
    """The window as the store records it now: epochs whose base is gone left out; with
    `keep_days` and `now`, where the promised window starts. `history`: the epochs and
    progress records when the caller read them already."""
    if history is None:
        history = [(e, read_progress(store, database_id, e))
                   for e in epochs(store, database_id)]
    return window_of(history, gone_bases(store, database_id, history), keep_days, now)
