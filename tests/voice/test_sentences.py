"""SentenceSplitter cutting a streamed answer into speakable pieces, and `speakable` turning Markdown into words."""

from __future__ import annotations

import pytest

from kvserve.voice.sentences import FIRST_CLAUSE_CHARS, MAX_CHARS, SentenceSplitter, speakable


def feed(text: str, step: int | None = None) -> tuple[list[str], list[str]]:
    """The pieces feed returns for `text` fed `step` characters at a time (all at once by default), and the rest
    that flush returns after."""
    splitter = SentenceSplitter()
    step = step or max(1, len(text))
    pieces = [piece for start in range(0, len(text), step) for piece in splitter.feed(text[start:start + step])]
    return pieces, splitter.flush()


def split(text: str, step: int | None = None) -> list[str]:
    """All pieces of `text`, the flushed rest included."""
    pieces, rest = feed(text, step)
    return pieces + rest


ANSWER = (
    "Paris is the capital of France, and it sits on the Seine. It has about two million people! "
    'People call it "the City of Light." Is it old? Yes (very old).\n'
    "Facts:\n1. It is big.\n2. It has 3.14 times more cafes than needed.\n- Museums too.\n\n"
    "The end, really"
)


@pytest.mark.parametrize("step", [2, 3, 7, 16, 50, len(ANSWER)])
def test_deltas_of_any_size_give_the_pieces_of_char_by_char(step: int) -> None:
    assert split(ANSWER, step) == split(ANSWER, 1)


def test_answer_pieces() -> None:
    assert split(ANSWER, 1) == [
        "Paris is the capital of France,",  # the first piece ends at a clause
        "and it sits on the Seine.",
        "It has about two million people!",
        'People call it "the City of Light."',
        "Is it old?",
        "Yes (very old).",
        "Facts:",
        "1. It is big.",
        "2. It has 3.14 times more cafes than needed.",
        "- Museums too.",
        "The end, really",
    ]


def test_sentence_ends_keep_closing_quotes_and_brackets() -> None:
    text = 'He said "stop!" Then he left (quietly.) Was it [really?] Yes… Done.'
    assert split(text) == ['He said "stop!"', "Then he left (quietly.)", "Was it [really?]", "Yes…", "Done."]


def test_a_full_stop_needs_white_space_after_it() -> None:
    assert split("Pi is 3.14 or so. The file is a.txt here.") == ["Pi is 3.14 or so.", "The file is a.txt here."]
    assert feed("Pi is 3.14", 1) == ([], ["Pi is 3.14"])


def test_line_breaks_end_pieces() -> None:
    assert split("Title\nA line without a stop\n\nAnother one\nlast") == [
        "Title", "A line without a stop", "Another one", "last"]


def test_a_lone_list_marker_joins_the_next_piece() -> None:
    assert split("1. First item.\n2. Second item.\n- A dash item.\n* A star item.\n") == [
        "1. First item.", "2. Second item.", "- A dash item.", "* A star item."]


def test_only_the_first_piece_may_end_at_a_clause() -> None:
    opening = "The answer to your question is simple"  # longer than FIRST_CLAUSE_CHARS
    assert len(opening) >= FIRST_CLAUSE_CHARS
    text = f"{opening}, really: it depends on the weather; mostly, it rains, and then the sun comes out again."
    assert split(text) == [
        f"{opening},",
        "really: it depends on the weather; mostly, it rains, and then the sun comes out again.",
    ]


def test_the_first_clause_needs_first_clause_chars_before_it() -> None:
    head = ("na" * FIRST_CLAUSE_CHARS)[:FIRST_CLAUSE_CHARS]
    assert split(f"{head}, then more. Next.") == [f"{head},", "then more.", "Next."]
    short = head[:-1]
    assert split(f"{short}, then more. Next.") == [f"{short}, then more.", "Next."]


def test_a_sentence_end_before_the_clause_wins() -> None:
    assert split("Yes. Now a long second sentence goes on, and on, and on.") == [
        "Yes.", "Now a long second sentence goes on, and on, and on."]


@pytest.mark.parametrize("step", [1, 1000])
def test_a_long_run_is_cut_at_its_last_space(step: int) -> None:
    text = "lorem ipsum dolor " * 30  # 540 characters, no sentence end
    pieces, rest = feed(text, step)
    assert len(pieces) == 2
    for piece in pieces:
        assert len(piece) <= MAX_CHARS
        assert set(piece.split()) <= {"lorem", "ipsum", "dolor"}  # whole words only
        assert len(piece) > MAX_CHARS - len("lorem ipsum dolor ")
    assert " ".join(pieces + rest).split() == text.split()


@pytest.mark.parametrize("step", [1, 1000])
def test_a_long_run_is_cut_at_its_last_comma(step: int) -> None:
    text = "abcdef," * 70  # the last comma in the first MAX_CHARS characters is not at MAX_CHARS
    cut = MAX_CHARS // 7 * 7
    assert cut != MAX_CHARS
    pieces, rest = feed(text, step)
    assert pieces == [text[:cut], text[cut:2 * cut]]
    assert rest == [text[2 * cut:]]


def test_a_long_run_without_comma_or_space_is_cut_at_max_chars() -> None:
    assert split("x" * (2 * MAX_CHARS + 20)) == ["x" * MAX_CHARS, "x" * MAX_CHARS, "x" * 20]


def test_flush_returns_the_rest_once() -> None:
    splitter = SentenceSplitter()
    assert splitter.feed("Done. An unfinished thought") == ["Done."]
    assert splitter.flush() == ["An unfinished thought"]
    assert splitter.flush() == []


def test_empty_pieces_are_never_returned() -> None:
    splitter = SentenceSplitter()
    pieces = [piece for delta in ["\n\n", "  \n", "Hello.\n\n\n", "   ", "\n", "World!  \n \n"]
              for piece in splitter.feed(delta)]
    assert pieces == ["Hello.", "World!"]
    assert splitter.flush() == []


def test_speakable_drops_code_blocks() -> None:
    assert speakable("Run this:\n```python\nprint('hi. there')\n```\nand see.") == "Run this: and see."
    assert speakable("An unclosed block ```python\nx = 1") == "An unclosed block"


def test_speakable_keeps_link_text() -> None:
    assert speakable("See [the docs](https://example.com/a_b) now.") == "See the docs now."


def test_speakable_removes_markup_characters() -> None:
    assert speakable("## **Bold** and _it_ `code` > quote | cell ~~gone~~") == "Bold and it code quote cell gone"


def test_speakable_of_markup_alone_is_empty() -> None:
    assert speakable("** `` ##") == ""
