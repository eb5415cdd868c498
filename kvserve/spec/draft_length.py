"""How many drafts a request proposes next: a length that follows its acceptance, and none at all once its
drafts have proved mostly wrong, so that such a request stops paying for verify rows (and draft-model passes)."""

from __future__ import annotations

from dataclasses import dataclass

# A request whose first MIN_VERIFIES verify steps accepted less than MIN_ACCEPTANCE of their drafts drafts no
# more: a verify row costs more than half a decode step on the CPU's 4-bit kernels (BENCHMARKS.md), so a guess
# right one time in five loses.
MIN_VERIFIES = 8
MIN_ACCEPTANCE = 0.2


def next_num_drafts(num_drafts: int, num_proposed: int, num_accepted: int, max_drafts: int) -> int:
    """A request's draft length after a verify step: one more when every draft was accepted, else one past the
    accepted ones (at least 1), so that a request whose guesses fail costs a 2-row verify, not a (1 + k)-row one."""
    if num_accepted == num_proposed:
        return min(max(num_drafts, num_proposed) + 1, max_drafts)
    return max(num_accepted + 1, 1)


@dataclass(slots=True)
class DraftLength:
    """One request's draft length and its drafts' record."""

    num_drafts: int = 0  # drafts to propose next; 0: the maximum
    num_verifies: int = 0
    num_proposed: int = 0
    num_accepted: int = 0

    def wanted(self, max_drafts: int) -> int:
        """Drafts to propose after this step's tokens (0 once they have proved mostly wrong)."""
        if self.num_verifies >= MIN_VERIFIES and self.num_accepted < MIN_ACCEPTANCE * self.num_proposed:
            return 0
        return self.num_drafts or max_drafts

    def update(self, num_proposed: int, num_accepted: int, max_drafts: int) -> None:
        """Follow a verify step that accepted `num_accepted` of `num_proposed` drafts."""
        self.num_drafts = next_num_drafts(self.num_drafts, num_proposed, num_accepted, max_drafts)
        self.num_verifies += 1
        self.num_proposed += num_proposed
        self.num_accepted += num_accepted
