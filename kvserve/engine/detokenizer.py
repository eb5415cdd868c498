"""Incremental detokenization that finds stop strings, safe for multi-byte UTF-8 characters."""

from __future__ import annotations

from typing import Any

from kvserve.engine.stop import StopStringMatch
from kvserve.sampling_params import SamplingParams

# Prompt tokens kept as decoding context: enough for a tokenizer that drops the leading
# space of the first token in a window (SentencePiece) to see the real word boundary.
_NUM_CONTEXT_TOKENS = 5
# Byte-level tokenizers decode an incomplete UTF-8 sequence to this character.
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns generated token ids into text one token at a time, reporting where a stop string appears.

    Whether a match stops the request is engine/stop.py's decision; once it does, `stop_at` ends the text there.

    Each step decodes only a short window of ids: [:read_offset] is text that was already
    emitted (context), [read_offset:] is new. The new text is the difference of the two
    decodes, emitted only once it no longer ends in U+FFFD (a partial character). Decoding
    with context matters: some tokenizers drop the leading space of a window's first token.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = params.skip_special_tokens
        self.stop: list[str] = list(params.stop or [])
        self.include_stop_str_in_output = params.include_stop_str_in_output
        # Search window for stop strings: the new text plus this many earlier characters.
        self._stop_tail = max((len(s) for s in self.stop), default=1) - 1
        self._special_ids = _special_token_ids(tokenizer) if self.skip_special_tokens else set()

        context = [t for t in prompt_token_ids if t not in self._special_ids]
        # Ids in the decode window; grows by one per token and is trimmed after each emit.
        self._window_ids = context[-_NUM_CONTEXT_TOKENS:]
        self._read_offset = len(self._window_ids)

        self._text = ""
        self._num_sent_chars = 0
        self.is_stopped = False  # the text ended at a stop string; later tokens are ignored

    @property
    def output_text(self) -> str:
        """Text generated so far, stop string handled; a trailing partial char waits for flush."""
        return self._text

    def append(self, token_id: int) -> StopStringMatch | None:
        """Add one generated token; the earliest stop string its new text completed, if any."""
        if self.is_stopped:
            return None
        if token_id in self._special_ids:
            return None  # skipped specials add no text; keeping them out keeps windows small
        self._window_ids.append(token_id)
        delta = self._new_text()
        if not delta or delta.endswith(_REPLACEMENT_CHAR):
            return None  # the last token ends mid-character: wait for the rest of its bytes
        self._advance()
        return self._add_text(delta)

    def flush(self) -> None:
        """Add any bytes still held as a partial character (call once the request is done)."""
        if self.is_stopped:
            return
        delta = self._new_text()
        self._advance()
        self._text += delta

    def stop_at(self, match: StopStringMatch) -> None:
        """End the text at a stop string the request stopped on (keeping it with include_stop_str_in_output)."""
        end = match.index + len(match.stop) if self.include_stop_str_in_output else match.index
        self._text = self._text[:end]
        self.is_stopped = True

    def next_delta(self, is_finished: bool) -> str:
        """Return text not returned before; hold back a possible stop-string start until done."""
        if is_finished:
            self.flush()
        end = len(self._text)
        if not is_finished and not self.is_stopped:
            end -= self._stop_prefix_len()
        # A stop truncation can only cut text that was held back, so end >= num_sent_chars.
        end = max(end, self._num_sent_chars)
        delta = self._text[self._num_sent_chars : end]
        self._num_sent_chars = end
        return delta

    def _new_text(self) -> str:
        """Text of the ids past the read offset, decoded in context; '' if there is none."""
        ids = self._window_ids
        if self._read_offset == len(ids):
            return ""
        prefix_text = self._decode(ids[: self._read_offset])
        full_text = self._decode(ids)
        return full_text[len(prefix_text) :]

    def _advance(self) -> None:
        """Mark the whole window as emitted; it becomes the context for the next token."""
        # Ids before the read offset are never needed again: drop them so windows stay short.
        del self._window_ids[: self._read_offset]
        self._read_offset = len(self._window_ids)

    def _decode(self, ids: list[int]) -> str:
        """Decode a window of ids with this request's special-token setting."""
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _add_text(self, delta: str) -> StopStringMatch | None:
        """Append decoded text, then look for a stop string ending in the new part."""
        start = max(len(self._text) - self._stop_tail, 0)
        self._text += delta
        return self._find_stop(start) if self.stop else None

    def _find_stop(self, start: int) -> StopStringMatch | None:
        """Earliest stop string occurrence at or after `start`."""
        best: StopStringMatch | None = None
        for stop in self.stop:
            index = self._text.find(stop, start)
            if index != -1 and (best is None or index < best.index):
                best = StopStringMatch(index, stop)
        return best

    def _stop_prefix_len(self) -> int:
        """Length of the longest text suffix that could be the start of a stop string."""
        text = self._text
        for length in range(min(self._stop_tail, len(text)), 0, -1):
            suffix = text[-length:]
            if any(stop.startswith(suffix) for stop in self.stop):
                return length
        return 0


def _special_token_ids(tokenizer: Any) -> set[int]:
    """Ids that decode(skip_special_tokens=True) drops: named specials and special added tokens."""
    ids = set(getattr(tokenizer, "all_special_ids", []))
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    ids.update(i for i, token in added.items() if getattr(token, "special", False))
    return ids
