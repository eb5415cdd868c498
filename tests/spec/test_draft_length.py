"""The draft length: it follows acceptance, and a request whose single guesses fail pauses, longer each time."""

from __future__ import annotations

from kvserve.spec.draft_length import MAX_PAUSE, DraftLength, next_num_drafts


def test_draft_length_grows_on_success_and_falls_on_a_rejection():
    assert next_num_drafts(2, 2, 2, max_drafts=5) == 3
    assert next_num_drafts(5, 5, 5, max_drafts=5) == 5
    assert next_num_drafts(5, 5, 0, max_drafts=5) == 1
    assert next_num_drafts(5, 5, 3, max_drafts=5) == 4
    assert next_num_drafts(5, 2, 2, max_drafts=5) == 5  # fewer were proposed (the match ran out): no penalty


def wanted_over(length: DraftLength, steps: int) -> list[int]:
    return [length.wanted(4) for _ in range(steps)]


def test_failed_single_guesses_pause_the_request_twice_as_long_each_time():
    length = DraftLength()
    assert length.wanted(4) == 4
    length.update(4, 0, max_drafts=4)  # a miss at length 4: down to 1, no pause yet
    assert wanted_over(length, 1) == [1]
    length.update(1, 0, max_drafts=4)
    assert wanted_over(length, 2) == [0, 1]  # paused one step
    length.update(1, 0, max_drafts=4)
    assert wanted_over(length, 3) == [0, 0, 1]  # then two
    length.update(1, 1, max_drafts=4)  # a hit ends the back-off
    assert length.next_pause == 1 and wanted_over(length, 1) == [2]


def test_the_pause_is_capped():
    length = DraftLength(num_drafts=1)
    for _ in range(10):
        length.update(1, 0, max_drafts=4)
        length.pause = 0
    assert length.next_pause == MAX_PAUSE
