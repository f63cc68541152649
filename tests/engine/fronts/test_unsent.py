"""`UnsentReplies`, the engine-wide bound on reply bytes the clients of both fronts have not read: holders count
their bytes, and past the bound the largest are cut by their front's own means (here, noting who was cut).
The last test holds replies unread on both fronts of a real engine."""

from __future__ import annotations

from trio_mapper.engine.fronts.unsent import MAX_UNSENT_REPLY_BYTES, UnsentReplies


def test_the_bound_is_1_gib_unless_told() -> None:
    assert UnsentReplies().max_bytes == MAX_UNSENT_REPLY_BYTES == 1 << 30
    assert UnsentReplies(100).max_bytes == 100


def test_holders_count_their_bytes_in_the_total() -> None:
    unsent = UnsentReplies(max_bytes=100)
    first = unsent.holder(lambda why: None)
    second = unsent.holder(lambda why: None, 30)
    first.grow(20)
    first.grow(5)
    first.shrink(10)
    assert (first.size, second.size, unsent.total) == (15, 30, 45)
    first.release()
    first.release()  # twice is harmless
    assert unsent.total == 30


def test_past_the_bound_the_largest_holder_is_cut_once_and_told_why() -> None:
    """A reviewer's 60 connections that never read 20 MB replies held 2.7 GiB for the 60 s each write may wait."""
    unsent = UnsentReplies(max_bytes=100)
    cut: dict[str, str] = {}
    small = unsent.holder(lambda why: cut.setdefault("small", why), 30)
    large = unsent.holder(lambda why: cut.setdefault("large", why), 60)
    assert not cut
    third = unsent.holder(lambda why: cut.setdefault("third", why), 20)  # 110 in all: the largest goes
    assert list(cut) == ["large"] and large.cut_called and not (small.cut_called or third.cut_called)
    assert cut["large"].endswith("and this one holds the most")
    third.grow(5)  # still over until the cut one's bytes are freed, but what the others hold fits
    assert list(cut) == ["large"]
    large.release()
    assert unsent.total == 55


def test_as_many_are_cut_as_it_takes_for_the_rest_to_fit() -> None:
    unsent = UnsentReplies(max_bytes=100)
    cut: list[int] = []
    holders = [unsent.holder(lambda why, n=n: cut.append(n), 40) for n in range(2)]
    holders[1].grow(1)
    assert cut == []  # 81
    unsent.holder(lambda why: cut.append(2), 90)  # 171: cutting the 90 leaves 81
    assert cut == [2]
    holders[0].grow(30)  # 81 + 30 besides the one cut: the 70 goes, the 41 stays
    assert cut == [2, 0]


def test_a_holder_with_nothing_is_never_cut() -> None:
    unsent = UnsentReplies(max_bytes=10)
    cut: list[str] = []
    unsent.holder(lambda why: cut.append("idle"))
    busy = unsent.holder(lambda why: cut.append("busy"))
    busy.grow(11)
    busy.grow(5)  # cut already: nobody else holds anything to cut
    assert cut == ["busy"]
