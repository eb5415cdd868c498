"""Logprobs in OpenAI's shapes: token ids to token strings and bytes, chat and legacy completion forms."""

from __future__ import annotations

import functools
from typing import Any

from kvserve.server.protocol import (
    ChatLogprobs,
    CompletionLogprobs,
    PromptLogprob,
    PromptLogprobs,
    TokenLogprob,
    TopLogprob,
)


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the printable character that stands for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(char): byte for byte, char in zip(printable, chars, strict=True)}


_BYTE_OF_CHAR = _byte_level_alphabet()


class TokenText:
    """A token's string and bytes as OpenAI reports them; cached, since a vocabulary is small."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self.is_byte_level = "ByteLevel" in type(decoder).__name__ if decoder is not None else False
        self.token = functools.lru_cache(maxsize=65536)(self._token)

    def _token(self, token_id: int) -> tuple[str, list[int]]:
        """(text, UTF-8 bytes) of one token; a token that is part of a character shows as 'bytes:\\x..'."""
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if self.is_byte_level and isinstance(piece, str) and all(c in _BYTE_OF_CHAR for c in piece):
            raw = bytes(_BYTE_OF_CHAR[c] for c in piece)
        else:
            raw = self.tokenizer.decode([token_id]).encode()
        try:
            return raw.decode("utf-8"), list(raw)
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), list(raw)


def _ranked(entry: dict[int, float], num_top: int) -> list[tuple[int, float]]:
    """The `num_top` most likely tokens of a position, best first."""
    return sorted(entry.items(), key=lambda item: -item[1])[:num_top]


def chat_logprobs(token_ids: list[int], logprobs: list[dict[int, float]], num_top: int,
                  token_text: TokenText) -> ChatLogprobs:
    """`choices[i].logprobs` of a chat answer for these tokens."""
    content = []
    for token_id, entry in zip(token_ids, logprobs, strict=True):
        text, raw = token_text.token(token_id)
        top = []
        for top_id, top_logprob in _ranked(entry, num_top):
            top_text, top_raw = token_text.token(top_id)
            top.append(TopLogprob(token=top_text, logprob=top_logprob, bytes=top_raw))
        content.append(TokenLogprob(token=text, logprob=entry[token_id], bytes=raw, top_logprobs=top))
    return ChatLogprobs(content=content)


def completion_logprobs(token_ids: list[int], logprobs: list[dict[int, float]], num_top: int,
                        token_text: TokenText, text_offset: int = 0) -> CompletionLogprobs:
    """`choices[i].logprobs` of a completion (tokens, token_logprobs, top_logprobs, text_offset)."""
    result = CompletionLogprobs()
    for token_id, entry in zip(token_ids, logprobs, strict=True):
        text, _ = token_text.token(token_id)
        result.tokens.append(text)
        result.token_logprobs.append(entry[token_id])
        result.top_logprobs.append({token_text.token(i)[0]: lp for i, lp in _ranked(entry, num_top)})
        result.text_offset.append(text_offset)
        text_offset += len(text)
    return result


def echoed_prompt_logprobs(token_ids: list[int], prompt_logprobs: list[dict[int, float] | None], num_top: int,
                           token_text: TokenText, text_offset: int = 0) -> CompletionLogprobs:
    """The legacy logprobs of an echoed prompt: its first token, which nothing predicts, has null ones."""
    result = CompletionLogprobs()
    for token_id, entry in zip(token_ids, prompt_logprobs, strict=True):
        text, _ = token_text.token(token_id)
        result.tokens.append(text)
        result.token_logprobs.append(None if entry is None else entry[token_id])
        result.top_logprobs.append(
            None if entry is None else {token_text.token(i)[0]: lp for i, lp in _ranked(entry, num_top)})
        result.text_offset.append(text_offset)
        text_offset += len(text)
    return result


def joined(first: CompletionLogprobs, second: CompletionLogprobs) -> CompletionLogprobs:
    """Two runs of legacy logprobs as one (echoed prompt, then generated tokens)."""
    return CompletionLogprobs(tokens=first.tokens + second.tokens,
                              token_logprobs=first.token_logprobs + second.token_logprobs,
                              top_logprobs=first.top_logprobs + second.top_logprobs,
                              text_offset=first.text_offset + second.text_offset)


def vllm_prompt_logprobs(token_ids: list[int], prompt_logprobs: list[dict[int, float] | None], num_top: int,
                         token_text: TokenText) -> PromptLogprobs:
    """vLLM's `prompt_logprobs`: per prompt token null (the first) or {token id: {logprob, rank, decoded_token}}
    holding the token itself and the `num_top` most likely ones."""
    result: PromptLogprobs = []
    for token_id, entry in zip(token_ids, prompt_logprobs, strict=True):
        if entry is None:
            result.append(None)
            continue
        # The engine's entry holds the true top alternatives, so their rank is known; the prompt token's only
        # when it is one of them.
        shown = {top_id: (logprob, rank) for rank, (top_id, logprob) in enumerate(_ranked(entry, num_top), 1)}
        shown.setdefault(token_id, (entry[token_id], None))
        result.append({str(i): PromptLogprob(logprob=lp, rank=rank, decoded_token=token_text.token(i)[0])
                       for i, (lp, rank) in shown.items()})
    return result
