"""LatenessLimit: how many requests the server lets in at once, learnt from the deadlines it meets.

The batcher's admission by deadline estimates a request's wait from the device's time per item.
That is the whole wait only while the device is what limits throughput. When the event loop is
(parsing, decoding and answering more requests than one core can), every request also waits for
the loop: before its headers are read, before it is queued, and after its batch returns, before its
answer is written. None of that is in the estimate, so the server let in as many requests as the
device could take, the loop fell further behind, and most answers came after their deadlines:
Poisson arrivals at twice the capacity on the scenes, every request with a 100 ms deadline, gave
12-132 answers a second within their deadlines (across runs), of a capacity of about 550. The
loop's delay shows in the answers themselves, so this limit learns from them, much as TCP's
congestion window learns from lost packets:

- it follows the share of answers that come late (past their deadlines, or 504), over about the
  last WINDOW answers;
- when that share passes TARGET with at least `floor` requests in the server, the limit drops to
  BACKOFF times the requests in the server (or times the limit, if lower), and the share starts
  again from zero. Answers to requests let in before the drop say nothing of the new limit (they
  were late for the same reason), so they are not counted;
- an answer on time grows the limit by 1 / limit, about one request more per limit's worth of
  answers, when the limit refused a request since the last growth or the server is at least half
  as full as the limit (otherwise the limit is not what holds requests back, and an answer on time
  says nothing of a higher one). Up to `ceiling` (where it starts: as many as the queue's bound
  and the device allow);
- RESET_S after the last late answer it counted, the limit is back at `ceiling`, so that a limit
  dropped in one burst does not hold back the next one, minutes later. A server whose load keeps
  its answers near the target share sees late answers far more often than that, and when the
  lateness comes back, the first drop, from the requests then in the server, brings the limit
  straight down again. Growing by 1 an answer on time once a hundred came on time in a row (TCP's
  slow start) overshot instead: at twice the capacity the limit rose past 130, and 93 % of the
  answers came on time in two runs, against 95-98 % in three without it.

Under `floor` requests in the server, lateness is not the load's doing (a 12-megapixel photo, say):
such answers are not in the share, and the limit never drops below it. The batcher leaves out the
answers that say nothing of the load at all: to a request that allowed less than the fastest batch
of its kind has taken (an idle server would miss it too), or whose deadline passed before it was
queued (its upload took the time, or it was spent before the server read it).

Each deadline class has a limit of its own (DeadlineClasses): requests whose allowances
(X-Request-Timeout-Ms) lie within a factor of two of each other. What makes an answer late is the
requests in the server, and a request allowing more time can take more of them: requests allowing
one to two batches' time (the running batch, then their own) come late at any load, and no limit
helps them. One limit for every request, lowered by them, refused the others too: at 70 % of the
capacity, with 10 % more allowing 15 ms beside them, 1.6-12 % of the requests without a deadline
were refused, the limit at 10-22. A limit of a class binds only that class, and caps the looser
classes' (see DeadlineClasses). Under an overloaded loop the late answers come in every class, and
each class's limit drops to what its deadlines bear; requests of a looser class keep the server
fuller than a tighter class's limit, so the tighter class is refused the most: at twice the
capacity, half the requests allowing 100 ms and half 200 ms, nearly all of the 100 ms ones and
18-36 % of the others, where one limit refused half of each, with as many answers within their
deadlines (434-513 a second, against 430-487).

A target share rather than any one late answer: near capacity a few answers come late however many
are let in, and a drop at each late answer refused a third of the requests there, and a third of
the answers on time with them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from app.errors import Overloaded

TARGET: Final = 0.05  # the share of late answers the limit holds the server under
WINDOW: Final = 100  # answers the late share is followed over (the weight of the newest is 1 / WINDOW)
BACKOFF: Final = 0.8
RESET_S: Final = 30.0


class LatenessLimit:
    def __init__(self, *, floor: int, ceiling: int) -> None:
        if not 1 <= floor <= ceiling:
            raise ValueError(f"the floor ({floor}) must be from 1 to the ceiling ({ceiling})")
        self.floor = floor
        self.ceiling = ceiling
        self.limit = float(ceiling)
        self.late_share = 0.0
        self._cut_at = float("-inf")  # time.perf_counter() of the last drop
        self._refused = False  # since the last growth
        self._late_at = float("-inf")  # time.perf_counter() of the last late answer counted

    def limit_at(self, now: float) -> float:
        """The limit at `now`: RESET_S after the last late answer counted, back at the ceiling."""
        if self.limit < self.ceiling and now - self._late_at >= RESET_S:
            self.limit = float(self.ceiling)
        return self.limit

    def refuses(self, in_server: int, now: float, cap: float = math.inf) -> bool:
        """Whether one more request is refused at `now`, with `in_server` requests admitted or running,
        by this limit or by `cap` (from other classes' limits), whichever is lower. Only a refusal by
        this limit is one that its answers on time should raise it for."""
        limit = self.limit_at(now)
        if in_server < min(limit, cap):
            return False
        if in_server >= limit:
            self._refused = True
        return True

    def answered(self, *, late: bool, in_server: int, admitted_at: float, now: float) -> None:
        """One answer, at `now`, to a request let in at `admitted_at` (time.perf_counter())."""
        self.limit_at(now)
        if admitted_at < self._cut_at:
            return
        loaded = in_server >= self.floor  # else the answer says nothing of the load: not in the share
        if loaded:
            self.late_share += (float(late) - self.late_share) / WINDOW
        if late:
            if loaded:
                self._late_at = now
                if self.late_share > TARGET:
                    self.limit = max(float(self.floor), min(self.limit, in_server) * BACKOFF)
                    self.late_share = 0.0
                    self._cut_at = now
            return
        if self._refused or 2 * (in_server + 1) >= self.limit:
            self.limit = min(float(self.ceiling), self.limit + 1 / self.limit)
            self._refused = False


def deadline_class(allowance_s: float) -> int:
    """The class of a request allowing `allowance_s`: allowances in (2^(k-1), 2^k] ms are class k
    (1 ms or less: 0)."""
    return max(0, math.ceil(math.log2(max(allowance_s * 1000, 1.0)) - 1e-9))


class DeadlineClasses:
    """A LatenessLimit per deadline class, each learning from its class's answers alone; the count
    of requests in the server is one for all. A class's limit is also at most 2^k times that of a
    class k steps tighter: the requests in the server are what makes an answer late, and twice the
    time takes about twice as many. Otherwise a looser class would start from the ceiling whenever
    its own answers had not come late yet, and fill the server far past what its deadlines bear
    before they did."""

    def __init__(self, *, floor: int, ceiling: int, on_new: Callable[[int], None]) -> None:
        self.floor = floor
        self.ceiling = ceiling
        self.limits: dict[int, LatenessLimit] = {}
        self._on_new = on_new  # e.g. a gauge for the class

    def _of(self, allowance_s: float) -> tuple[int, LatenessLimit]:
        key = deadline_class(allowance_s)
        limit = self.limits.get(key)
        if limit is None:
            limit = self.limits[key] = LatenessLimit(floor=self.floor, ceiling=self.ceiling)
            self._on_new(key)
        return key, limit

    def limit_of(self, key: int, now: float) -> float:
        """The class's limit at `now`, with the cap from the tighter classes' limits."""
        return min(self.limits[key].limit_at(now), self._cap(key, now))

    def _cap(self, key: int, now: float) -> float:
        return min(
            (limit.limit_at(now) * 2 ** (key - other) for other, limit in self.limits.items() if other < key),
            default=math.inf,
        )

    def refusing(self, in_server: int, now: float, allowance_s: float) -> Binding | None:
        """What refuses one more request allowing `allowance_s` at `now`; None when it may come in."""
        key, limit = self._of(allowance_s)
        cap = self._cap(key, now)
        return Binding(key, math.ceil(min(limit.limit, cap))) if limit.refuses(in_server, now, cap) else None

    def answered(self, *, late: bool, in_server: int, admitted_at: float, now: float, allowance_s: float) -> None:
        self._of(allowance_s)[1].answered(late=late, in_server=in_server, admitted_at=admitted_at, now=now)

    def bindings(self, in_server: int, now: float) -> tuple[Binding, ...]:
        """The classes whose limits refuse their requests at `now`, for a device's front-ends."""
        limits = {key: self.limit_of(key, now) for key in self.limits}
        return tuple(Binding(key, math.ceil(limit)) for key, limit in limits.items() if in_server >= limit)


@dataclass(frozen=True)
class Binding:
    """A deadline class's limit as it refuses: while `limit` or more requests are in the server.
    Also what a device process tells its front-ends."""

    deadline_class: int
    limit: int

    def error(self, retry_after_s: int) -> Overloaded:
        return Overloaded(
            f"the server's answers to requests {describe(self.deadline_class)} are coming late: until they are"
            f" on time again, it lets such requests in while fewer than {self.limit} are in the server",
            retry_after_s=retry_after_s,
        )


def describe(key: int) -> str:
    """A deadline class in words, as the 429's message names it."""
    return f"allowing {_span_ms(key)} ms"


def gauge_label(key: int) -> str:
    """A deadline class as the admission-limit gauge labels it: its allowances in ms ("9-16")."""
    return _span_ms(key)


def _span_ms(key: int) -> str:
    """The whole milliseconds class `key` holds: (2^(key-1), 2^key] ms, 1 ms for class 0."""
    low, high = (2 ** (key - 1) + 1, 2**key) if key > 0 else (1, 1)
    return str(low) if low == high else f"{low}-{high}"
