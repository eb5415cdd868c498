"""Tool-calling test helpers: a byte-level tokenizer with any chat template, and a fake engine that replies a script."""

from __future__ import annotations

import time
from typing import Any

from serve_harness import FakeEngine

from kvserve.inputs import InputProcessor
from kvserve.outputs import CompletionOutput, RequestMetrics, RequestOutput

# The bundled SmolLM2's template: plain ChatML, no tools (so the fallback renders them).
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

# A small template that renders tools itself (as Qwen's and Llama 3.1's do): its own markers, so a test can
# tell its rendering from the fallback's.
TOOLS_TEMPLATE = (
    "{% if tools %}[TOOLS]{% for tool in tools %}{{ tool.function.name }}:{{ tool.function.parameters | tojson }};"
    "{% endfor %}[/TOOLS]\n{% endif %}"
    "{% for message in messages %}[{{ message.role }}]"
    "{% if message.tool_calls %}{% for call in message.tool_calls %}CALL {{ call.function.name }}"
    "({{ call.function.arguments | tojson }}){% endfor %}{% else %}{{ message.content }}{% endif %}"
    "{% if message.tool_call_id %} #{{ message.tool_call_id }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}")


def byte_tokenizer(template: str) -> Any:
    """A real transformers tokenizer with one token per byte (so decode gives back the rendered text exactly)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: i for i, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    tokenizer.chat_template = template
    return tokenizer


class ScriptedEngine(FakeEngine):
    """A FakeEngine whose every request replies `script` (set before the request), `piece_size` characters a step."""

    def __init__(self, template: str = CHATML_TEMPLATE, piece_size: int = 3) -> None:
        super().__init__(step_s=0.002)
        self.tokenizer = byte_tokenizer(template)
        self.max_model_len = 8192
        self.input_processor = InputProcessor(self.tokenizer, vocab_size=1000, max_model_len=self.max_model_len)
        self.script = "Hello!"
        self.piece_size = piece_size
        self.scripts: dict[str, str] = {}
        self.params: dict[str, Any] = {}  # request id -> the SamplingParams it was given

    def add_request(self, request_id: str, prompt: Any, params: Any, arrival_time: float | None = None) -> None:
        super().add_request(request_id, prompt, params, arrival_time)
        self.scripts[request_id] = self.script
        self.params[request_id] = params

    def prompt_text(self, request_id: str) -> str:
        """The prompt a request was given, as text."""
        return self.tokenizer.decode(self.prompts[request_id])

    def _advance(self, request_id: str) -> RequestOutput:
        request, script = self.requests[request_id], self.scripts[request_id]
        start = request.num_produced * self.piece_size
        piece = script[start:start + self.piece_size]
        request.num_produced += 1
        request.token_ids.append(request.num_produced)
        done = start + self.piece_size >= len(script)
        if done:
            del self.requests[request_id]
        now = time.monotonic()
        metrics = RequestMetrics(arrival_time=request.arrival, first_scheduled_time=request.arrival,
                                 first_token_time=now, last_token_time=now, finished_time=now if done else None,
                                 num_prompt_tokens=len(self.prompts[request_id]),
                                 num_generation_tokens=request.num_produced)
        completion = CompletionOutput(0, script[:start + self.piece_size], list(request.token_ids),
                                      "stop" if done else None, None, None, delta_text=piece,
                                      delta_token_ids=[request.num_produced])
        return RequestOutput(request_id, None, self.prompts[request_id], [completion], done, metrics)
