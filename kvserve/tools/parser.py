"""Tool calls out of a reply, as it streams: content pieces and call deltas, the same however the text is split.

Read formats (what the fallback prompt asks for, and what tool-aware templates of Hermes/Qwen style teach):
- `<tool_call>{"name": "f", "arguments": {...}}</tool_call>` anywhere in the reply, any number of them;
- a bare call object `{"name": "f", "arguments": {...}}` where a call may start (the reply's start, or right after
  a call), and a JSON array of such objects (the `required` constraint's output); `parameters` is read as
  `arguments` (Llama-style models and vLLM's `required` schema use it).
A call is committed once `{"name": "<declared tool>", "arguments":` is read; from then on its arguments stream
as the model writes them (their raw text: only constrained decoding guarantees valid JSON). A `<tool_call>`
block whose keys come in another order is parsed whole at `</tool_call>`. Anything else (an unknown name, a
body that is not a call) stays content. Whitespace around calls is not content.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass, field
from enum import Enum

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
_ARGUMENT_KEYS = ('"arguments"', '"parameters"')
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


@dataclass
class ToolCallDelta:
    """A piece of call `index`: its name on the first piece only, then argument text."""

    index: int
    name: str | None = None
    arguments: str = ""


@dataclass
class ParsedDelta:
    """What a piece of reply adds: content text and call pieces (one entry per call touched)."""

    content: str = ""
    calls: list[ToolCallDelta] = field(default_factory=list)

    def add_call_piece(self, index: int, name: str | None = None, arguments: str = "") -> None:
        """Append to call `index`, merging with its last piece in this delta."""
        if self.calls and self.calls[-1].index == index and name is None:
            self.calls[-1].arguments += arguments
        else:
            self.calls.append(ToolCallDelta(index, name, arguments))

    def extend(self, other: ParsedDelta) -> None:
        """Add another delta after this one."""
        self.content += other.content
        for call in other.calls:
            self.add_call_piece(call.index, call.name, call.arguments)

    def __bool__(self) -> bool:
        return bool(self.content or self.calls)


class _Match(Enum):
    YES = 1
    MORE = 2  # a prefix: more text may still match
    NO = 3


def _literal(text: str, pos: int, literal: str) -> _Match:
    """Whether `literal` is at `pos` (MORE: the text ends inside it)."""
    rest = text[pos:pos + len(literal)]
    if rest == literal:
        return _Match.YES
    return _Match.MORE if len(rest) < len(literal) and literal.startswith(rest) else _Match.NO


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def match_call_header(text: str) -> tuple[_Match, str, int]:
    """Read `"name": "f", "arguments":` (text starts after the object's `{`): (match, name, end offset)."""
    pos = _skip_space(text, 0)
    for literal in ('"name"', ":"):
        found = _literal(text, pos, literal)
        if found is not _Match.YES:
            return found, "", 0
        pos = _skip_space(text, pos + len(literal))
    found = _literal(text, pos, '"')
    if found is not _Match.YES:
        return found, "", 0
    end = pos + 1
    while end < len(text) and text[end] in _NAME_CHARS:
        end += 1
    if end == len(text):
        return _Match.MORE, "", 0
    if text[end] != '"':
        return _Match.NO, "", 0
    name, pos = text[pos + 1:end], _skip_space(text, end + 1)
    found = _literal(text, pos, ",")
    if found is not _Match.YES:
        return found, "", 0
    pos = _skip_space(text, pos + 1)
    keys = [_literal(text, pos, key) for key in _ARGUMENT_KEYS]
    if _Match.YES not in keys:
        return (_Match.MORE if _Match.MORE in keys else _Match.NO), "", 0
    pos = _skip_space(text, pos + len(_ARGUMENT_KEYS[keys.index(_Match.YES)]))
    found = _literal(text, pos, ":")
    return (found, name, pos + 1) if found is _Match.YES else (found, "", 0)


class _ValueScanner:
    """Finds where a JSON value ends, a character at a time (strings, escapes and nesting)."""

    def __init__(self) -> None:
        self.depth = 0
        self.started = False
        self.in_string = False
        self.escaped = False
        self.done = False

    def take(self, char: str) -> bool:
        """Whether `char` belongs to the value (False: the value ended before it)."""
        if not self.started:
            self.started = True
            self.in_string = char == '"'
            self.depth = 1 if char in "{[" else 0
            self.done = False
            return True
        if self.in_string:
            if self.escaped:
                self.escaped = False
            elif char == "\\":
                self.escaped = True
            elif char == '"':
                self.in_string = False
                self.done = self.depth == 0
            return True
        if self.depth == 0:  # a number or a literal: ends before a delimiter
            if char in ",}] \t\r\n":
                self.done = True
                return False
            return True
        if char == '"':
            self.in_string = True
        elif char in "{[":
            self.depth += 1
        elif char in "}]":
            self.depth -= 1
            self.done = self.depth == 0
        return True


class _Mode(Enum):
    TEXT = 1
    HEADER = 2  # after `{` of a call: name and the arguments key not yet read
    ARGUMENTS = 3
    CLOSING = 4  # after the arguments: the object's `}`, then `</tool_call>` for a tagged call
    DEFERRED = 5  # a tagged call whose keys are in another order: parsed whole at `</tool_call>`
    ARRAY = 6  # between the elements of an array of calls


class ToolCallParser:
    """Splits a streaming reply into content and calls of the declared tools; `feed` then `finish`."""

    def __init__(self, tool_names: Collection[str]) -> None:
        self.tool_names = frozenset(tool_names)
        self.num_calls = 0
        self._mode = _Mode.TEXT
        self._pending = ""  # text read but not yet decided
        self._opening = ""  # the text that opened the current call: content again if the call fails
        self._tagged = False  # the current call opened with <tool_call>
        self._in_array = False
        self._array_is_empty = False  # ARRAY: right after `[`, before the first call
        self._at_boundary = True  # nothing but whitespace since the start or the last call
        self._held_space = ""  # trailing whitespace of the content, given out only if content follows
        self._closing: list[str] = []  # CLOSING: what must still come, in order
        self._scanner = _ValueScanner()
        self._out = ParsedDelta()

    def feed(self, text: str) -> ParsedDelta:
        """Content and call pieces that `text` (the next piece of the reply) settles."""
        self._pending += text
        return self._run(final=False)

    def finish(self) -> ParsedDelta:
        """The end of the reply: what was held back is settled (a call cut short keeps its partial arguments)."""
        return self._run(final=True)

    def _run(self, final: bool) -> ParsedDelta:
        self._out = ParsedDelta()
        steps = {_Mode.TEXT: self._text, _Mode.HEADER: self._header, _Mode.ARGUMENTS: self._arguments,
                 _Mode.CLOSING: self._close, _Mode.DEFERRED: self._deferred, _Mode.ARRAY: self._array}
        while steps[self._mode](final):
            pass
        return self._out

    # ---- content -----------------------------------------------------------------------------

    def _content(self, text: str) -> None:
        text = self._held_space + text
        if self._at_boundary:
            text = text.lstrip()
        body = text.rstrip()
        self._held_space = text[len(body):]
        if body:
            self._out.content += body
            self._at_boundary = False

    def _fail_call(self) -> bool:
        """The call did not parse: its opening is content, the rest is read again as text."""
        self._in_array = False
        self._content(self._opening)
        self._mode = _Mode.TEXT
        return True

    def _commit_call(self, name: str, arguments: str = "") -> None:
        self._held_space = ""  # whitespace before a call is not content
        self._out.add_call_piece(self.num_calls, name=name, arguments=arguments)

    def _begin_call(self, opening: str, tagged: bool) -> None:
        self._mode, self._opening, self._tagged = _Mode.HEADER, opening, tagged

    # ---- modes: each returns whether it made progress ------------------------------------------

    def _text(self, final: bool) -> bool:
        text = self._pending
        if self._at_boundary:
            start = text.lstrip()
            if not start:
                if final:
                    self._pending = ""
                return False
            if start[0] in "{[":
                self._pending = start[1:]
                if start[0] == "[":
                    self._in_array = self._array_is_empty = True
                    self._opening, self._mode = "[", _Mode.ARRAY
                else:
                    self._begin_call("{", tagged=False)
                return True
        at = text.find(TOOL_CALL_OPEN)
        if at >= 0:
            self._content(text[:at])
            self._pending = text[at + len(TOOL_CALL_OPEN):]
            self._begin_call(TOOL_CALL_OPEN, tagged=True)
            return True
        keep = 0 if final else _partial_suffix(text, TOOL_CALL_OPEN)
        self._content(text[:len(text) - keep])
        self._pending = text[len(text) - keep:]
        if final:
            self._content(self._pending)
            self._pending = ""
        return False

    def _header(self, final: bool) -> bool:
        body = self._pending
        if self._tagged:
            start = _skip_space(body, 0)
            if start == len(body):
                if final:
                    return self._fail_call()
                return False
            if body[start] != "{":
                self._mode = _Mode.DEFERRED
                return True
            body = body[start + 1:]
        found, name, end = match_call_header(body)
        if found is _Match.MORE and not final:
            return False
        if found is not _Match.YES or name not in self.tool_names:
            if self._tagged:
                self._mode = _Mode.DEFERRED
                return True
            return self._fail_call()
        self._pending = body[end:]
        self._commit_call(name)
        self._scanner = _ValueScanner()
        self._mode = _Mode.ARGUMENTS
        return True

    def _arguments(self, final: bool) -> bool:
        scanner, text = self._scanner, self._pending
        start = 0 if scanner.started else _skip_space(text, 0)  # whitespace before the value is not in it
        taken = start
        while taken < len(text) and not scanner.done and scanner.take(text[taken]):
            taken += 1
        if taken > start:
            self._out.add_call_piece(self.num_calls, arguments=text[start:taken])
        self._pending = text[taken:]
        if scanner.done or final:
            self._end_call()
            return True
        return False

    def _end_call(self) -> None:
        self.num_calls += 1
        self._closing = ["}", TOOL_CALL_CLOSE] if self._tagged else ["}"]
        self._mode = _Mode.CLOSING

    def _close(self, final: bool) -> bool:
        while self._closing:
            pos = _skip_space(self._pending, 0)
            found = _literal(self._pending, pos, self._closing[0])
            if found is _Match.MORE and not final:
                return False
            if found is not _Match.YES:
                break  # not the expected end: the rest is read as text
            self._pending = self._pending[pos + len(self._closing.pop(0)):]
        self._closing = []
        self._at_boundary = True
        self._mode = _Mode.ARRAY if self._in_array else _Mode.TEXT
        return True

    def _deferred(self, final: bool) -> bool:
        end = self._pending.find(TOOL_CALL_CLOSE)
        if end < 0 and not final:
            return False
        body = self._pending if end < 0 else self._pending[:end]
        call = _whole_call(body, self.tool_names)
        if call is None:
            return self._fail_call()
        self._commit_call(*call)
        self.num_calls += 1
        self._pending = "" if end < 0 else self._pending[end + len(TOOL_CALL_CLOSE):]
        self._at_boundary = True
        self._mode = _Mode.TEXT
        return True

    def _array(self, final: bool) -> bool:
        text = self._pending
        pos = _skip_space(text, 0)
        if pos == len(text):
            if not final:
                return False
            return self._fail_call() if self._array_is_empty else self._leave_array()
        if self._array_is_empty:  # right after `[`: a call object or not an array of calls at all
            if text[pos] != "{":
                return self._fail_call()
            self._array_is_empty = False
            self._pending = text[pos + 1:]
            self._begin_call("[" + text[:pos + 1], tagged=False)
            return True
        if text[pos] == "]":
            self._pending = text[pos + 1:]
            return self._leave_array()
        if text[pos] == ",":
            after = _skip_space(text, pos + 1)
            if after == len(text):
                return self._leave_array() if final else False
            if text[after] == "{":
                self._pending = text[after + 1:]
                self._begin_call("{", tagged=False)
                return True
        return self._leave_array()

    def _leave_array(self) -> bool:
        self._in_array = False
        self._mode = _Mode.TEXT
        return True


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of `text` that could be the start of `tag`."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


def _whole_call(body: str, tool_names: frozenset[str]) -> tuple[str, str] | None:
    """(name, arguments JSON) of a whole call object, or None when it is not a call of a declared tool."""
    try:
        call = json.loads(body)
    except ValueError:
        return None
    if not isinstance(call, dict) or call.get("name") not in tool_names:
        return None
    arguments = call.get("arguments", call.get("parameters"))
    if arguments is None:
        return None
    return call["name"], arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


class NamedCallParser:
    """The reply of a named `tool_choice`: the whole text is the arguments of that one call."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.num_calls = 0

    def feed(self, text: str) -> ParsedDelta:
        """The next piece of the arguments (the first piece also names the call)."""
        out = ParsedDelta()
        if self.num_calls and not text:
            return out
        out.add_call_piece(0, name=self.name if self.num_calls == 0 else None, arguments=text)
        self.num_calls = 1
        return out

    def finish(self) -> ParsedDelta:
        """Names the call if the reply was empty."""
        return self.feed("") if self.num_calls == 0 else ParsedDelta()


def parse_reply(parser: ToolCallParser | NamedCallParser, text: str) -> ParsedDelta:
    """A whole reply at once: content and each call with its full arguments."""
    out = parser.feed(text)
    out.extend(parser.finish())
    return out
