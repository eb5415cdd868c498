"""POST /tokenize and /detokenize in vLLM's shapes: the served model's tokenizer and chat template over HTTP."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from kvserve.server.errors import invalid_request
from kvserve.server.protocol import ChatMessage, _Request


class TokenizeRequest(_Request):
    """A prompt, or a conversation rendered with the chat template (as the chat endpoint would)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_generation_prompt: bool = True  # messages only: end with the assistant's turn opening
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    """The token ids, their count and the context window they must fit (with the reply)."""

    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None  # the vocabulary's pieces (byte-level BPE shows a space as 'Ġ')


class DetokenizeRequest(_Request):
    """Token ids to turn back into text."""

    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    """The text of the token ids, special tokens included."""

    prompt: str


router = APIRouter()


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    """Token ids of a prompt or of a conversation; exactly one of the two."""
    server = request.app.state.server
    server.check_model(body.model)
    processor = server.input_processor
    try:
        if (body.prompt is None) == (body.messages is None):
            raise ValueError("prompt or messages is required (exactly one of the two)")
        if body.messages is not None:
            messages = [message.for_template() for message in body.messages]
            tokens = await run_in_threadpool(processor.apply_chat_template, messages,
                                           add_generation_prompt=body.add_generation_prompt)
        else:
            _, tokens = await run_in_threadpool(processor.tokenize, body.prompt)
    except ValueError as error:
        raise invalid_request(error) from None
    token_strs = None
    if body.return_token_strs:
        token_strs = processor.tokenizer.convert_ids_to_tokens(tokens)
    return TokenizeResponse(count=len(tokens), max_model_len=server.max_model_len, tokens=tokens,
                            token_strs=token_strs)


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    """The text of token ids, which must be in the model's vocabulary."""
    server = request.app.state.server
    server.check_model(body.model)
    vocab_size = server.input_processor.vocab_size
    bad = next((t for t in body.tokens if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise invalid_request(ValueError(f"tokens must be in [0, {vocab_size}), got {bad}"))
    tokenizer = server.input_processor.tokenizer
    return DetokenizeResponse(prompt=await run_in_threadpool(tokenizer.decode, body.tokens))
