"""LLM: the offline facade with vLLM's names (`generate`, `chat`), plus a streaming iterator."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any

from tqdm import tqdm

from kvserve.config import EngineConfig
from kvserve.engine.engine import Engine, EngineStats
from kvserve.inputs import Messages, PromptInput
from kvserve.outputs import RequestOutput
from kvserve.sampling_params import SamplingParams


class LLM:
    """Generate text for batches of prompts; `LLM(model=None)` runs the bundled SmolLM2-135M."""

    def __init__(self, model: str | None = None, show_progress: bool = True, **kwargs: Any) -> None:
        self.engine = Engine(EngineConfig.from_kwargs(model=model, **kwargs), show_progress)
        self.show_progress = show_progress  # the loading bars, and generate's unless use_tqdm says otherwise
        self._ids = itertools.count()

    def get_tokenizer(self) -> Any:
        """The Hugging Face tokenizer of the loaded model."""
        return self.engine.tokenizer

    def generate(self, prompts: PromptInput | Sequence[PromptInput],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool | None = None) -> list[RequestOutput]:
        """Run every prompt to completion, batched continuously; outputs come back in prompt order. A progress bar
        unless `use_tqdm` is False (None: as `show_progress`)."""
        prompts = _as_list(prompts)
        params = _params_for(prompts, sampling_params)
        ids: list[str] = []
        try:
            for prompt, prompt_params in zip(prompts, params, strict=True):
                ids.append(self._add(prompt, prompt_params))
        except ValueError:
            for request_id in ids:  # all or nothing: a bad prompt queues none of the batch
                self.engine.abort_request(request_id)
            raise
        finished: dict[str, RequestOutput] = {}
        show_bar = self.show_progress if use_tqdm is None else use_tqdm
        with tqdm(total=len(ids), desc="Generating", unit="req", disable=not show_bar, leave=False) as bar:
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        bar.update(1)
        return [finished[i] for i in ids]

    def chat(self, messages: Messages | list[Messages],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool | None = None, tools: list[dict[str, Any]] | None = None) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation (offering `tools`, OpenAI-shaped, as vLLM's
        LLM.chat does: the reply's calls are text, parsed by the server only), then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [{"prompt_token_ids": self.apply_chat_template(c, tools)} for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def apply_chat_template(self, messages: Messages, tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Token ids of a conversation (and the tools it may call) rendered with the model's template, ready for
        the reply."""
        return self.engine.input_processor.apply_chat_template(messages, tools)

    def stream(self, prompt: PromptInput, sampling_params: SamplingParams | None = None
               ) -> Iterator[RequestOutput]:
        """Generate one prompt, yielding an output (with `delta_text`) after every new token."""
        request_id = self._add(prompt, sampling_params or SamplingParams())
        try:
            while True:
                for output in self.engine.step():
                    if output.request_id == request_id:
                        yield output
                        if output.finished:
                            return
        finally:
            self.engine.abort_request(request_id)

    def stats(self) -> EngineStats:
        """Engine-wide numbers: KV blocks in use / total, memory, token counts."""
        return self.engine.stats()

    def _add(self, prompt: PromptInput, params: SamplingParams) -> str:
        request_id = str(next(self._ids))
        self.engine.add_request(request_id, prompt, params)
        return request_id


def _as_list(prompts: PromptInput | Sequence[PromptInput]) -> list[PromptInput]:
    if isinstance(prompts, str | dict):
        return [prompts]
    if prompts and isinstance(prompts[0], int):
        return [list(prompts)]  # one prompt given as token ids
    return list(prompts)


def _params_for(prompts: list, params: SamplingParams | Sequence[SamplingParams] | None
                ) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * len(prompts)
    if isinstance(params, SamplingParams):
        return [params] * len(prompts)
    if len(params) != len(prompts):
        raise ValueError(f"sampling_params has {len(params)} entries for {len(prompts)} prompts")
    return list(params)

