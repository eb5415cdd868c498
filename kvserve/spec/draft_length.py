"""How many drafts a request proposes next: a length that follows its acceptance, and pauses after failed single
guesses, so that a request whose drafts keep missing stops paying for verify rows (and draft-model passes)."""

from __future__ import annotations

from dataclasses import dataclass

MAX_PAUSE = 32  # steps: a request whose guesses fail is retried at least this often


def next_num_drafts(num_drafts: int, num_proposed: int, num_accepted: int, max_drafts: int) -> int:
    """A request's draft length after a verify step: one more when every draft was accepted, else one past the
    accepted ones (at least 1), so that a request whose guesses fail costs a 2-row verify, not a (1 + k)-row one."""
    if num_accepted == num_proposed:
        return min(max(num_drafts, num_proposed) + 1, max_drafts)
    return max(num_accepted + 1, 1)


@dataclass(slots=True)
class DraftLength:
    """One request's draft length and pause."""

    num_drafts: int = 0  # drafts to propose next; 0: the maximum
    pause: int = 0  # sampling steps left without drafts
    next_pause: int = 1  # the pause after the next failed single guess (doubles while they keep failing)

    def wanted(self, max_drafts: int) -> int:
        """Drafts to propose after this step's tokens (0 while paused: each call is one step)."""
        if self.pause:
            self.pause -= 1
            return 0
        return self.num_drafts or max_drafts

    def update(self, num_proposed: int, num_accepted: int, max_drafts: int) -> None:
        """Follow a verify step that accepted `num_accepted` of `num_proposed` drafts."""
        self.num_drafts = next_num_drafts(self.num_drafts, num_proposed, num_accepted, max_drafts)
        if num_accepted:
            self.next_pause = 1
        elif num_proposed == 1:
            self.pause, self.next_pause = self.next_pause, min(2 * self.next_pause, MAX_PAUSE)
