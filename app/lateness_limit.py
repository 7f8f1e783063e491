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

The limit binds only requests that allow no more time than the late answers did: it follows the
longest allowance among the late answers it counted since it was last at its ceiling (`deadline_s`),
and a request with more time left than that is let in beyond the limit. Requests that allow one to
two batches' time (the running batch, then their own) come late at any load, and no limit helps
them; while the limit bound every request, 10 % of the requests allowing 15 ms, at 70 % of the
capacity, dropped it to 10-22 and had 1.6-12 % of the requests without a deadline refused. Bound to
the hurried, it refused none of the others in the same runs. An overloaded loop makes answers with
longer deadlines late as well, and the limit's reach grows with them.

A target share rather than any one late answer: near capacity a few answers come late however many
are let in, and a drop at each late answer refused a third of the requests there, and a third of
the answers on time with them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

from app.errors import Overloaded

TARGET: Final = 0.05  # the share of late answers the limit holds the server under
WINDOW: Final = 100  # answers the late share is followed over (the weight of the newest is 1 / WINDOW)
BACKOFF: Final = 0.8
RESET_S: Final = 30.0
# Allowances are whole milliseconds (X-Request-Timeout-Ms); the time left is the allowance less a
# clock difference, which can round above it. Within half a millisecond counts as the same allowance.
SAME_WITHIN_S: Final = 0.0005


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
        # The longest allowance among the late answers counted since the limit was last at its
        # ceiling: requests with more time left than that are not what comes late.
        self.deadline_s = 0.0

    def binding(self, in_server: int, now: float) -> Binding | None:
        """Whom the limit refuses at `now` with `in_server` requests admitted or running; None while
        it lets every request in. RESET_S after the last late answer, it is back at the ceiling."""
        if in_server < self.limit:
            return None
        if now - self._late_at >= RESET_S:
            self.limit, self.deadline_s = float(self.ceiling), 0.0
            if in_server < self.limit:
                return None
        return Binding(math.ceil(self.limit), self.deadline_s)

    def refusing(self, in_server: int, now: float, allowed_s: float | None = None) -> Binding | None:
        """The binding that refuses one more request at `now`, with `allowed_s` left before its
        deadline (None: unknown, bound like the tightest); None when it may come in."""
        binding = self.binding(in_server, now)
        if binding is None or not binding.refuses(allowed_s):
            return None
        self._refused = True
        return binding

    def answered(
        self, *, late: bool, in_server: int, admitted_at: float, now: float, allowance_s: float | None = None
    ) -> None:
        """One answer, at `now`, to a request let in at `admitted_at` (time.perf_counter()) that
        allowed `allowance_s` in all (None: unknown, as if it allowed any time)."""
        if admitted_at < self._cut_at:
            return
        loaded = in_server >= self.floor  # else the answer says nothing of the load: not in the share
        if loaded:
            self.late_share += (float(late) - self.late_share) / WINDOW
        if late:
            if loaded:
                self._late_at = now
                self.deadline_s = max(self.deadline_s, math.inf if allowance_s is None else allowance_s)
                if self.late_share > TARGET:
                    self.limit = max(float(self.floor), min(self.limit, in_server) * BACKOFF)
                    self.late_share = 0.0
                    self._cut_at = now
            return
        if self._refused or 2 * (in_server + 1) >= self.limit:
            self.limit = min(float(self.ceiling), self.limit + 1 / self.limit)
            self._refused = False


@dataclass(frozen=True)
class Binding:
    """The limit as it refuses: requests with no more than `deadline_s` left (within SAME_WITHIN_S),
    while `limit` or more requests are in the server. Also what a device process tells its front-ends."""

    limit: int
    deadline_s: float

    def refuses(self, allowed_s: float | None) -> bool:
        return allowed_s is None or allowed_s <= self.deadline_s + SAME_WITHIN_S

    def error(self, retry_after_s: int) -> Overloaded:
        whom = (
            "to requests"
            if math.isinf(self.deadline_s)
            else f"to requests allowing {self.deadline_s * 1000:.0f} ms or less"
        )
        return Overloaded(
            f"the server's answers {whom} are coming late: until they are on time again, it lets such requests"
            f" in while fewer than {self.limit} are in the server",
            retry_after_s=retry_after_s,
        )
