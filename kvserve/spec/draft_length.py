"""How many drafts a request proposes next: a length that follows its acceptance, and a single probe now and then
once its recent drafts have proved mostly wrong, so that such a request stops paying for verify rows (and
draft-model passes) while its output does not repeat, and drafts again once it does (a copy that starts with a
paraphrase, a chat answer that quotes itself)."""

from __future__ import annotations

from dataclasses import dataclass

# A request whose recent drafts were accepted less than MIN_ACCEPTANCE of the time, after its first MIN_VERIFIES
# verify steps, stops drafting: a verify row costs more than half a decode step on the CPU's 4-bit kernels
# (BENCHMARKS.md), so a guess right one time in five loses. "Recent": each verify step's counts weigh DECAY times
# the step before's, so the last ~5 steps decide.
MIN_VERIFIES = 8
MIN_ACCEPTANCE = 0.2
DECAY = 0.8
# While stopped, every PROBE_INTERVAL-th step proposes one draft: a two-row verify, ~1/10 of a step. A probe that
# hits clears the recent record, so the request drafts again until its drafts miss again. (Stopping for good lost
# a copy whose first verify steps missed: bench_spec's copy prompts with 8 drafts, 212 against 295 tokens/s.)
PROBE_INTERVAL = 8


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
    recent_proposed: float = 0.0  # the counts with older verify steps weighed down by DECAY per step
    recent_accepted: float = 0.0
    steps_stopped: int = 0  # steps since drafting stopped

    @property
    def stopped(self) -> bool:
        """Whether the recent drafts proved mostly wrong."""
        return self.num_verifies >= MIN_VERIFIES and self.recent_accepted < MIN_ACCEPTANCE * self.recent_proposed

    def wanted(self, max_drafts: int) -> int:
        """Drafts to propose after this step's tokens: while stopped 0, or 1 on every PROBE_INTERVAL-th step
        (called once per step: it counts them)."""
        if not self.stopped:
            self.steps_stopped = 0
            return self.num_drafts or max_drafts
        self.steps_stopped += 1
        return 1 if self.steps_stopped % PROBE_INTERVAL == 0 else 0

    def update(self, num_proposed: int, num_accepted: int, max_drafts: int) -> None:
        """Follow a verify step that accepted `num_accepted` of `num_proposed` drafts."""
        if self.stopped and num_accepted:  # a probe hit: the output repeats again, the misses before are past
            self.recent_proposed = self.recent_accepted = 0.0
        self.num_drafts = next_num_drafts(self.num_drafts, num_proposed, num_accepted, max_drafts)
        self.num_verifies += 1
        self.recent_proposed = self.recent_proposed * DECAY + num_proposed
        self.recent_accepted = self.recent_accepted * DECAY + num_accepted
