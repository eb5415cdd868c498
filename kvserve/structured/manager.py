"""The engine's side of structured output: grammars, one matcher per sequence, the step's bitmask.

Like vLLM's StructuredOutputManager: the engine owns it; before a step it fills the allowed-token bitmask of the
constrained sequences that sample in that step (it crosses to the runner in the SchedulerOutput as plain data),
and after the step each appended token advances its sequence's matcher. The matcher's state is a function of the
sequence's generated tokens, which survive a preemption, so a recompute needs nothing from here.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Collection, Mapping
from typing import Any

import llguidance
import llguidance.hf
import numpy as np

from kvserve.engine.request import Request
from kvserve.engine.sched_output import SchedulerOutput
from kvserve.structured.grammar import compile_matcher
from kvserve.structured.params import StructuredOutputsParams

logger = logging.getLogger(__name__)


class StructuredOutputManager:
    """Compiles constraints (bounded LRU), keeps each constrained sequence's matcher, builds the step's bitmask."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int, eos_token_ids: Collection[int],
                 cache_size: int = 64) -> None:
        self._hf_tokenizer = hf_tokenizer
        self._vocab_size = vocab_size  # the model's: logits rows are this wide
        self._eos_token_ids = sorted(eos_token_ids)
        self._tokenizer: llguidance.LLTokenizer | None = None  # built on the first constrained request (~1 s)
        self._cache_size = cache_size
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()  # cache key -> pristine matcher
        self._matchers: dict[str, llguidance.LLMatcher] = {}  # sequence (child request) id -> its matcher

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        """llguidance's view of the vocabulary: token bytes, EOS, and the mask width."""
        if self._tokenizer is None:
            # Ids past the tokenizer's own (a padded embedding) are never allowed; llguidance sizes masks by n_vocab.
            n_vocab = max(self._vocab_size, len(self._hf_tokenizer))
            try:
                self._tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer, n_vocab=n_vocab,
                                                               eos_token=self._eos_token_ids)
            except Exception as error:  # a slow (Python) tokenizer cannot be read by llguidance
                raise ValueError(f"structured_outputs is not supported with this model's tokenizer: {error}") from None
        return self._tokenizer

    @property
    def num_words(self) -> int:
        """int32 words per bitmask row: ceil(vocab / 32)."""
        return (self.tokenizer.vocab_size + 31) // 32

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._matchers

    @property
    def num_active(self) -> int:
        """Sequences under a constraint right now."""
        return len(self._matchers)

    def add_requests(self, params: StructuredOutputsParams, request_ids: list[str]) -> None:
        """One matcher per sequence (each of the `n` samples its own); ValueError naming the field when the
        constraint does not compile. Nothing is registered on error."""
        template = self._compile(params)
        for request_id in request_ids:
            self._matchers[request_id] = template.deep_copy()

    def _compile(self, params: StructuredOutputsParams) -> llguidance.LLMatcher:
        key = params.cache_key
        template = self._compiled.get(key)
        if template is None:
            template = compile_matcher(params, self.tokenizer)
            self._compiled[key] = template
            if len(self._compiled) > self._cache_size:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(key)
        return template

    def free(self, request_id: str) -> None:
        """Forget a finished or aborted sequence's matcher; unknown ids are ignored."""
        self._matchers.pop(request_id, None)

    def fill_bitmask(self, output: SchedulerOutput, requests: Mapping[str, Request]) -> None:
        """Set the step's `structured_output_req_ids` and `grammar_bitmask` [rows, num_words] int32: the
        constrained requests whose step reaches their last known token, so that the runner samples them; a request
        verifying k drafts has 1 + k consecutive rows, row j the grammar's state after its first j drafts."""
        drafts = output.scheduled_spec_decode_tokens
        req_ids = [request_id for request_id, num_new in output.num_scheduled_tokens.items()
                   if request_id in self._matchers and requests[request_id].num_computed_tokens + num_new
                   - len(drafts.get(request_id, ())) == requests[request_id].num_tokens]
        if not req_ids:
            return
        num_words = self.num_words
        num_rows = sum(1 + len(drafts.get(request_id, ())) for request_id in req_ids)
        bitmask = np.empty((num_rows, num_words), dtype=np.int32)  # bit j of word w: token 32 * w + j allowed
        row = 0
        for request_id in req_ids:
            self._fill_rows(self._matchers[request_id], drafts.get(request_id, []), bitmask[row:])
            row += 1 + len(drafts.get(request_id, ()))
        output.structured_output_req_ids = req_ids
        output.grammar_bitmask = bitmask

    def _fill_rows(self, matcher: llguidance.LLMatcher, drafts: list[int], rows: np.ndarray) -> None:
        """Rows 0..len(drafts) of `rows`: the matcher's mask, then its mask after each draft in turn (consumed,
        then rolled back). From the first draft the grammar rejects (or an EOS) on, rows repeat the last one
        computed: the row before a rejected draft masks it out, so the target never accepts it, and rows after a
        rejection or an accepted EOS are never kept."""
        num_bytes = rows.shape[1] * 4
        valid = matcher.validate_tokens(drafts) if drafts else 0
        # An EOS draft ends the grammar (it cannot be rolled back); if accepted, nothing after it is kept.
        valid = next((index for index, draft in enumerate(drafts[:valid]) if draft in self._eos_token_ids), valid)
        matcher.unsafe_compute_mask_ptr(rows[0].ctypes.data, num_bytes)  # llguidance drops the GIL meanwhile
        for index, draft in enumerate(drafts[:valid], start=1):
            matcher.consume_token(draft)
            matcher.unsafe_compute_mask_ptr(rows[index].ctypes.data, num_bytes)
        rows[valid + 1:len(drafts) + 1] = rows[valid]
        if valid:
            matcher.rollback(valid)

    def accept_token(self, request_id: str, token_id: int) -> bool:
        """Advance the sequence's matcher by one appended token; False (and a log line) if the grammar rejects it,
        which the mask should make impossible."""
        matcher = self._matchers[request_id]
        if matcher.consume_token(token_id):
            return True
        logger.error("structured output of %s rejected token %d: %s", request_id, token_id, matcher.get_error())
        return False

    def is_terminated(self, request_id: str) -> bool:
        """Whether the grammar is complete: nothing but EOS may follow (or EOS was consumed)."""
        return self._matchers[request_id].is_stopped()
