"""`kvserve chat`: a conversation with the model in the terminal.

Each turn sends the whole conversation through the chat template (the prefix cache keeps the earlier turns' KV).
At the prompt: an empty line asks again, /reset forgets the conversation (the system prompt stays), /help lists the
commands, /exit or Ctrl-D quits. Ctrl-C stops the answer being written and keeps the session: it is taken at the
next token, so the engine step it lands in finishes and the aborted request frees its KV blocks; at the prompt,
Ctrl-C quits.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator

from kvserve.cli import stream_to_stdout
from kvserve.llm import LLM
from kvserve.loader.weights import resolve_model_path
from kvserve.outputs import RequestOutput
from kvserve.sampling_params import SamplingParams

HELP = "/reset forgets the conversation, /help shows this, /exit or Ctrl-D quits; Ctrl-C stops an answer"


@contextlib.contextmanager
def interrupts_as_flag() -> Iterator[Callable[[], bool]]:
    """Inside, Ctrl-C sets a flag (read through the yielded callable) instead of raising KeyboardInterrupt in the
    middle of an engine step."""
    interrupted = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda _signum, _frame: interrupted.set())
    try:
        yield interrupted.is_set
    finally:
        signal.signal(signal.SIGINT, previous)


class ChatSession:
    """One conversation: its messages, and what each line typed at the prompt does."""

    def __init__(self, llm: LLM, params: SamplingParams, system: str | None = None,
                 on_answer: Callable[[RequestOutput | None, float], None] | None = None) -> None:
        self.llm = llm
        self.params = params
        self.system = [{"role": "system", "content": system}] if system else []
        self.messages = list(self.system)
        self.on_answer = on_answer  # called with each answer's output and wall seconds (--verbose's metrics)

    def banner(self) -> str:
        """What the session says first: the model, the answer limit, the commands."""
        model = resolve_model_path(self.llm.engine.config.load.model).name
        return f"kvserve chat with {model}; answers of up to {self.params.max_tokens} tokens (--max-tokens).\n{HELP}"

    def handle(self, line: str) -> bool:
        """Act on one line typed at the prompt; False once the session should end."""
        command = line.strip()
        if command in ("/exit", "/quit"):
            return False
        if command == "/reset":
            self.messages = list(self.system)
            print("(conversation cleared)")
        elif command == "/help":
            print(HELP)
        elif command:
            self.answer(line)
        return True

    def answer(self, user: str) -> RequestOutput | None:
        """Stream the model's answer to `user` and keep both in the conversation."""
        self.messages.append({"role": "user", "content": user})
        prompt = {"prompt_token_ids": self.llm.apply_chat_template(self.messages)}
        start = time.monotonic()
        with interrupts_as_flag() as interrupted:
            output = stream_to_stdout(self.llm.stream(prompt, self.params), stop=interrupted)
        if interrupted():
            print("[stopped]")
        elif output is not None and output.outputs[0].finish_reason == "length":
            print(f"[cut at {self.params.max_tokens} tokens: --max-tokens sets the limit]")
        self.messages.append({"role": "assistant", "content": output.outputs[0].text if output else ""})
        if self.on_answer is not None:
            self.on_answer(output, time.monotonic() - start)
        return output


def run_interactive(session: ChatSession) -> None:
    """Read lines until /exit, Ctrl-D or Ctrl-C at the prompt."""
    print(session.banner())
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not session.handle(line):
            return
