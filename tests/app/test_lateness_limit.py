"""LatenessLimit: the admission limit that late answers lower and answers on time raise again."""

from __future__ import annotations

import pytest

from app.errors import Overloaded
from app.lateness_limit import Binding, LatenessLimit


def answer(
    limit: LatenessLimit,
    late: bool,
    in_server: int,
    at: float = 1.0,
    admitted_at: float = 0.5,
    allowance_s: float | None = None,
) -> None:
    limit.answered(late=late, in_server=in_server, admitted_at=admitted_at, now=at, allowance_s=allowance_s)


def allows(limit: LatenessLimit, in_server: int, now: float, allowed_s: float | None = None) -> bool:
    return limit.refusing(in_server, now, allowed_s) is None


def test_it_starts_at_the_queues_bound_and_lets_in_up_to_it() -> None:
    limit = LatenessLimit(floor=8, ceiling=256)
    assert limit.limit == 256
    assert allows(limit, 255, now=1.0)
    assert not allows(limit, 256, now=1.0)


def test_it_drops_when_the_late_share_passes_five_percent_not_at_one_late_answer() -> None:
    limit = LatenessLimit(floor=8, ceiling=256)
    for _ in range(5):  # 1 - 0.99**5 = 4.9 % of the last hundred answers
        answer(limit, late=True, in_server=40)
    assert limit.limit == 256
    answer(limit, late=True, in_server=40)  # 5.9 %
    assert limit.limit == 32.0  # 0.8 of the 40 in the server
    assert limit.late_share == 0.0
    assert allows(limit, 31, now=1.5) and not allows(limit, 32, now=1.5)


def test_answers_to_requests_let_in_before_a_drop_are_not_counted() -> None:
    limit = LatenessLimit(floor=8, ceiling=256)
    for _ in range(6):
        answer(limit, late=True, in_server=40, at=2.0)
    assert limit.limit == 32.0
    for _ in range(20):  # let in at 1.5, before the drop at 2.0: late for the same reason
        answer(limit, late=True, in_server=30, at=2.1, admitted_at=1.5)
    assert (limit.limit, limit.late_share) == (32.0, 0.0)
    for _ in range(6):  # let in after it: the new limit is too high as well
        answer(limit, late=True, in_server=30, at=2.3, admitted_at=2.05)
    assert limit.limit == 24.0  # 0.8 of the 30 in the server


def test_late_answers_with_fewer_than_the_floor_in_the_server_change_nothing() -> None:
    limit = LatenessLimit(floor=8, ceiling=256)
    for _ in range(50):
        answer(limit, late=True, in_server=7)
    assert (limit.limit, limit.late_share) == (256, 0.0)  # not in the share either
    for _ in range(6):
        answer(limit, late=True, in_server=8)
    assert limit.limit == 8.0  # 0.8 of 8, held at the floor


def test_answers_on_time_grow_it_by_one_over_the_limit_while_the_server_is_half_as_full() -> None:
    limit = LatenessLimit(floor=8, ceiling=34)
    for _ in range(6):
        answer(limit, late=True, in_server=20)
    assert limit.limit == 16.0
    after = {"at": 2.0, "admitted_at": 1.5}  # let in after the drop
    answer(limit, late=False, in_server=6, **after)  # 7 of 16 with this one: far from binding
    assert limit.limit == 16.0
    answer(limit, late=False, in_server=7, **after)
    assert limit.limit == 16.0625
    for _ in range(1000):
        answer(limit, late=False, in_server=33, **after)
    assert limit.limit == 34.0  # the ceiling


def test_after_a_refusal_an_answer_on_time_grows_it_however_few_are_in_the_server() -> None:
    """A batch can take every request the limit lets in: its answers find the server empty, but the
    limit was what held the others back."""
    limit = LatenessLimit(floor=2, ceiling=64)
    for _ in range(6):
        answer(limit, late=True, in_server=10)
    assert limit.limit == 8.0
    after = {"at": 2.0, "admitted_at": 1.5}
    answer(limit, late=False, in_server=0, **after)
    assert limit.limit == 8.0
    assert not allows(limit, 8, now=2.0)  # one refused
    answer(limit, late=False, in_server=0, **after)
    assert limit.limit == 8.125
    answer(limit, late=False, in_server=0, **after)  # nobody refused since
    assert limit.limit == 8.125


def test_thirty_seconds_after_the_last_late_answer_it_is_back_at_the_ceiling() -> None:
    limit = LatenessLimit(floor=2, ceiling=64)
    for _ in range(6):
        answer(limit, late=True, in_server=10, at=100.0)
    assert limit.limit == 8.0
    assert not allows(limit, 8, now=129.9)
    assert allows(limit, 8, now=130.0) and limit.limit == 64.0
    for _ in range(6):  # the lateness is back: the first drop is from the requests then in the server
        answer(limit, late=True, in_server=40, at=131.0, admitted_at=130.5)
    assert limit.limit == 32.0


def test_it_binds_only_requests_with_no_more_time_left_than_the_late_answers_allowed() -> None:
    """Requests allowing one or two batches' time come late at any load: the limit they lower must
    not refuse requests that allow more."""
    limit = LatenessLimit(floor=2, ceiling=64)
    assert limit.deadline_s == 0.0
    for allowance_s in (0.015, 0.015, 0.025, 0.015, 0.02, 0.015):
        answer(limit, late=True, in_server=10, allowance_s=allowance_s)
    assert (limit.limit, limit.deadline_s) == (8.0, 0.025)  # the longest of them
    assert limit.binding(7, now=1.0) is None
    assert limit.binding(8, now=1.0) == Binding(limit=8, deadline_s=0.025)
    assert not allows(limit, 8, now=1.0, allowed_s=0.025)
    assert not allows(limit, 8, now=1.0, allowed_s=0.0255)  # within half the header's resolution: the same
    assert not allows(limit, 8, now=1.0, allowed_s=None)  # unknown: bound
    assert allows(limit, 8, now=1.0, allowed_s=0.026)
    assert allows(limit, 40, now=1.0, allowed_s=10.0)
    after = {"at": 2.0, "admitted_at": 1.5}  # let in after the drop
    answer(limit, late=True, in_server=1, allowance_s=5.0, **after)  # under the floor: not counted
    assert limit.deadline_s == 0.025
    answer(limit, late=True, in_server=10, allowance_s=None, **after)  # unknown: as if any time
    assert not allows(limit, 8, now=2.0, allowed_s=10.0)
    assert limit.binding(8, now=2.0) == Binding(limit=8, deadline_s=float("inf"))
    assert allows(limit, 8, now=32.0, allowed_s=0.01)  # reset to the ceiling, for every request
    assert (limit.limit, limit.deadline_s) == (64.0, 0.0)


def test_a_floor_above_the_ceiling_is_refused() -> None:
    with pytest.raises(ValueError, match="floor"):
        LatenessLimit(floor=9, ceiling=8)


def test_its_refusal_says_whom_it_binds_and_how_far() -> None:
    hurried = Binding(limit=13, deadline_s=0.015).error(retry_after_s=2)
    assert type(hurried) is Overloaded and (hurried.code, hurried.retry_after_s) == ("overloaded", 2)
    assert hurried.message == (
        "the server's answers to requests allowing 15 ms or less are coming late: until they are on time again,"
        " it lets such requests in while fewer than 13 are in the server"
    )
    everyone = Binding(limit=4, deadline_s=float("inf")).error(retry_after_s=1)
    assert everyone.message.startswith("the server's answers to requests are coming late:")
