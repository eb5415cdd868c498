"""The draft length: it follows acceptance, and stops for a request whose drafts prove mostly wrong."""

from __future__ import annotations

from kvserve.spec.draft_length import MIN_VERIFIES, DraftLength, next_num_drafts


def test_draft_length_grows_on_success_and_falls_on_a_rejection():
    assert next_num_drafts(2, 2, 2, max_drafts=5) == 3
    assert next_num_drafts(5, 5, 5, max_drafts=5) == 5
    assert next_num_drafts(5, 5, 0, max_drafts=5) == 1
    assert next_num_drafts(5, 5, 3, max_drafts=5) == 4
    assert next_num_drafts(5, 2, 2, max_drafts=5) == 5  # fewer were proposed (the match ran out): no penalty


def test_a_request_whose_drafts_prove_mostly_wrong_drafts_no_more():
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
