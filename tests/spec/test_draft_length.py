"""The draft length: it follows acceptance, stops for a request whose recent drafts prove mostly wrong, and probes
with one draft now and then so that a request whose output starts repeating drafts again."""

from __future__ import annotations

from kvserve.spec.draft_length import MIN_VERIFIES, PROBE_INTERVAL, DraftLength, next_num_drafts


def test_draft_length_grows_on_success_and_falls_on_a_rejection():
    assert next_num_drafts(2, 2, 2, max_drafts=5) == 3
    assert next_num_drafts(5, 5, 5, max_drafts=5) == 5
    assert next_num_drafts(5, 5, 0, max_drafts=5) == 1
    assert next_num_drafts(5, 5, 3, max_drafts=5) == 4
    assert next_num_drafts(5, 2, 2, max_drafts=5) == 5  # fewer were proposed (the match ran out): no penalty


def test_a_request_whose_drafts_prove_mostly_wrong_stops_drafting():
    length = DraftLength()
    for _ in range(MIN_VERIFIES - 1):
        length.update(1, 0, max_drafts=4)
    assert length.wanted(4) == 1  # not judged yet
    length.update(4, 1, max_drafts=4)  # 1 of 7 accepted after MIN_VERIFIES steps: below MIN_ACCEPTANCE
    assert length.wanted(4) == 0
    hits = DraftLength()
    for _ in range(MIN_VERIFIES):
        hits.update(4, 1, max_drafts=4)  # one in four: above MIN_ACCEPTANCE
    assert hits.wanted(4) == 2


def test_a_stopped_request_probes_and_drafts_again_once_its_output_repeats():
    length = DraftLength()
    for _ in range(MIN_VERIFIES):
        length.update(4, 0, max_drafts=8)  # a copy that starts with a paraphrase: every draft wrong
    wanted = [length.wanted(8) for _ in range(2 * PROBE_INTERVAL)]
    assert wanted == ([0] * (PROBE_INTERVAL - 1) + [1]) * 2  # one draft every PROBE_INTERVAL steps
    length.update(1, 1, max_drafts=8)  # the probe hit: the copy has begun
    assert length.wanted(8) == 2  # drafting again, growing from the probe's length
    length.update(2, 2, max_drafts=8)
    assert length.wanted(8) == 3


def test_old_misses_weigh_less_than_recent_hits():
    length = DraftLength()
    for _ in range(4 * MIN_VERIFIES):
        length.update(4, 0, max_drafts=4)
    for _ in range(3):
        length.update(4, 4, max_drafts=4)  # 12 of 140 drafts accepted in all, but all of the last 12
    assert length.wanted(4) == 4
