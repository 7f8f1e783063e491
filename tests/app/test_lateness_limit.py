"""LatenessLimit: the admission limit that late answers lower and answers on time raise again."""

from __future__ import annotations

import pytest

from app.errors import Overloaded
from app.lateness_limit import Binding, DeadlineClasses, LatenessLimit, deadline_class, describe, gauge_label


def answer(limit: LatenessLimit, late: bool, in_server: int, at: float = 1.0, admitted_at: float = 0.5) -> None:
    limit.answered(late=late, in_server=in_server, admitted_at=admitted_at, now=at)


def allows(limit: LatenessLimit, in_server: int, now: float) -> bool:
    return not limit.refuses(in_server, now)


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


def test_deadline_classes_are_allowances_within_a_factor_of_two() -> None:
    allowances = [0.0005, 0.001, 0.002, 0.003, 0.004, 0.015, 0.016, 0.017, 0.1, 10.0]
    assert [deadline_class(a) for a in allowances] == [0, 0, 1, 2, 2, 4, 4, 5, 7, 14]
    assert [describe(k) for k in (0, 1, 2, 4, 7)] == [
        "allowing 1 ms",
        "allowing 2 ms",
        "allowing 3-4 ms",
        "allowing 9-16 ms",
        "allowing 65-128 ms",
    ]
    assert [gauge_label(k) for k in (0, 4)] == ["1", "9-16"]


def test_each_deadline_class_learns_a_limit_of_its_own_and_binds_only_its_requests() -> None:
    """Requests allowing 15 ms come late at any load: their limit must not refuse requests that
    allow more, even one of which came late once."""
    new: list[int | None] = []
    classes = DeadlineClasses(floor=2, ceiling=64, on_new=new.append)
    classes.answered(late=True, in_server=10, admitted_at=0.5, now=1.0, allowance_s=0.1)  # 1 % of its class
    for allowance_s in (0.015, 0.012, 0.016, 0.015, 0.009, 0.015):  # six of the class 9-16 ms
        classes.answered(late=True, in_server=10, admitted_at=0.5, now=1.0, allowance_s=allowance_s)
    assert new == [7, 4]
    assert (classes.limits[4].limit, classes.limits[7].limit) == (8.0, 64.0)
    assert classes.refusing(8, 1.0, 0.010) == Binding(4, 8)
    assert classes.refusing(7, 1.0, 0.010) is None
    assert classes.refusing(40, 1.0, 0.1) is None and classes.refusing(40, 1.0, 10.0) is None
    assert classes.bindings(8, 1.0) == (Binding(4, 8),)
    assert classes.bindings(7, 1.0) == ()
    assert new == [7, 4, 14]  # the class of 10 s, met at admission
    assert classes.refusing(8, 31.0, 0.015) is None  # 30 s after its last late answer: back at the ceiling
    assert classes.limits[4].limit == 64.0
    assert classes.bindings(64, 31.0) == (Binding(7, 64), Binding(4, 64), Binding(14, 64))  # at the ceiling, all


def test_a_looser_class_takes_at_most_twice_the_requests_of_a_class_twice_as_tight() -> None:
    """Its own answers on time so far, requests allowing 200 ms are still held near what those
    allowing 100 ms bear (twice as many), not let in to the ceiling until they come late too."""
    classes = DeadlineClasses(floor=2, ceiling=256, on_new=lambda key: None)
    for _ in range(6):
        classes.answered(late=True, in_server=25, admitted_at=0.5, now=1.0, allowance_s=0.1)
    classes.answered(late=False, in_server=25, admitted_at=0.5, now=1.0, allowance_s=0.2)
    classes.answered(late=False, in_server=25, admitted_at=0.5, now=1.0, allowance_s=0.05)
    assert [classes.limits[key].limit for key in (7, 8, 6)] == [20.0, 256.0, 256.0]
    assert [classes.limit_of(key, 1.0) for key in (7, 8, 6)] == [20.0, 40.0, 256.0]  # only looser ones capped
    assert classes.refusing(39, 1.0, 0.2) is None
    assert classes.refusing(40, 1.0, 0.2) == Binding(8, 40)
    assert classes.refusing(100, 1.0, 0.05) is None
    assert classes.bindings(40, 1.0) == (Binding(7, 20), Binding(8, 40))


def test_a_floor_above_the_ceiling_is_refused() -> None:
    with pytest.raises(ValueError, match="floor"):
        LatenessLimit(floor=9, ceiling=8)


def test_its_refusal_says_whom_it_binds_and_how_far() -> None:
    hurried = Binding(deadline_class=4, limit=13).error(retry_after_s=2)
    assert type(hurried) is Overloaded and (hurried.code, hurried.retry_after_s) == ("overloaded", 2)
    assert hurried.message == (
        "the server's answers to requests allowing 9-16 ms are coming late: until they are on time again,"
        " it lets such requests in while fewer than 13 are in the server"
    )
