"""The OpenAI-compatible HTTP server: FastAPI routes over one AsyncEngine."""

from __future__ import annotations

import logging
import pathlib
import uuid
from dataclasses import dataclass

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool

from kvserve.config import EngineConfig
from kvserve.distributed.disaggregation import (
    DecodeConnector,
    PrefillService,
    PrefillUnavailableError,
    check_disaggregation,
)
from kvserve.distributed.executor import WorkerDiedError
from kvserve.engine.async_engine import AsyncEngine, EngineDeadError, GenerateRequest, OverloadedError
from kvserve.loader.weights import resolve_model_path
from kvserve.server.audio import router as audio_router
from kvserve.server.auth import ApiKeyMiddleware
from kvserve.server.config import ServerConfig
from kvserve.server.drain import Drain, DrainingServer
from kvserve.server.errors import OpenAIError, install_error_handlers, invalid_request, overloaded
from kvserve.server.kv_view import router as kv_view_router
from kvserve.server.limits import BodySizeLimitMiddleware, PromptLengthGuard
from kvserve.server.logprobs import TokenText
from kvserve.server.metrics import CONTENT_TYPE, ServerMetrics
from kvserve.server.openapi import install_openapi, sse
from kvserve.server.paths import StripTrailingSlashMiddleware
from kvserve.server.playground import install_playground
from kvserve.server.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    HealthStatus,
    ModelCard,
    ModelList,
)
from kvserve.server.response_cache import ResponseCache
from kvserve.server.serving import CompletionFormatter, Formatter, OutputStream, collect
from kvserve.server.streaming import ClosingStreamingResponse, unless_disconnected
from kvserve.server.tokenize import router as tokenize_router
from kvserve.server.tools import chat_formatter, constrain, tool_plan
from kvserve.server.voice import install_voice
from kvserve.server.websocket import SocketEndpoint, socket_router

logger = logging.getLogger(__name__)


def model_name_of(model: str | None) -> str:
    """The default served name: the model file's or directory's name."""
    path = pathlib.Path(resolve_model_path(model))
    return path.stem if path.suffix == ".gguf" else path.name


class _Server:
    """What the routes share: the engine, its input processor, metrics and options."""

    def __init__(self, async_engine: AsyncEngine, metrics: ServerMetrics, config: ServerConfig,
                 kv_connector: DecodeConnector | None = None) -> None:
        self.async_engine = async_engine
        self.kv_connector = kv_connector  # a decode instance's link to its prefill instance
        self.metrics = metrics
        self.config = config
        self.model_name = config.served_model_name or model_name_of(async_engine.engine.config.load.model)
        self.input_processor = async_engine.engine.input_processor  # the prompt and length rules
        self.max_model_len: int = async_engine.engine.max_model_len
        self.token_text = TokenText(async_engine.engine.tokenizer)
        self.response_cache = ResponseCache(config.response_cache_size, metrics)
        self.length_guard = PromptLengthGuard(async_engine.engine.tokenizer, self.max_model_len)
        self.drain = Drain(config.drain_timeout_s, config.retry_after_s)

    def check_model(self, name: str | None) -> str:
        """The served name; 404 for any other model."""
        served = self.model_name
        if name is not None and name != served:
            raise OpenAIError(404, f"model {name!r} does not exist; this server serves {served!r}",
                              param="model", code="model_not_found")
        return served

    def admit(self, num_seqs: int) -> None:
        """A cheap early 503 (draining, queue full) or 400 (never fits) before tokenizing; `open` checks again."""
        self.drain.check_open()
        try:
            self.async_engine.check_admission(num_seqs, self.config.max_waiting_requests)
        except OverloadedError:
            raise overloaded(self.config.retry_after_s) from None
        except ValueError as error:
            raise invalid_request(error) from None

    async def open(self, job: Job) -> OutputStream:
        """The job's outputs: replayed from the response cache, or from the engine (and recorded for it)."""
        self.drain.check_open()
        cached = self.response_cache.lookup(job.cache_key, [r.request_id for r in job.requests])
        if cached is not None:
            job.formatter.response_cache_hit = True
            return cached
        if self.kv_connector is not None:
            try:
                await self.kv_connector.prefetch([request.prompt for request in job.requests])
            except PrefillUnavailableError as error:
                raise OpenAIError(503, str(error), type="server_error", code="prefill_unavailable") from None
        try:
            engine_stream = await self.async_engine.generate(job.requests, self.config.max_waiting_requests)
        except OverloadedError:
            raise overloaded(self.config.retry_after_s) from None
        except ValueError as error:
            raise invalid_request(error, job.renames) from None
        except EngineDeadError as error:
            raise OpenAIError(503, str(error), type="server_error", code="engine_dead") from None
        self.drain.track(engine_stream)  # until it is read to the end or aborted
        return self.response_cache.recording(job.cache_key, engine_stream)

    async def run(self, request: Request, job: Job, stream: bool) -> Response:
        """Submit the job, then answer with a whole response or an SSE stream."""
        formatter = job.formatter
        outputs_stream = await self.open(job)
        if stream:
            return ClosingStreamingResponse(formatter.stream(outputs_stream, job.num_choices),
                                            on_close=outputs_stream.abort, media_type="text/event-stream",
                                            headers={"Cache-Control": "no-cache"})
        try:
            finished, outputs = await unless_disconnected(request, collect(outputs_stream))
        finally:
            outputs_stream.abort()  # a no-op once finished; covers a collect cancelled before it began
        if not finished:
            # Nobody is listening; 499 is the conventional "client closed request" status for logs.
            return Response(status_code=499)
        return JSONResponse(formatter.response(outputs).model_dump())


@dataclass
class Job:
    """One API request made ready for the engine, whatever carries it (HTTP, SSE or a WebSocket)."""

    requests: list[GenerateRequest]
    formatter: Formatter
    num_choices: int
    renames: dict[str, str]  # engine field names -> the API's, for error messages
    cache_key: str | None = None  # the response cache's key; None: not cacheable


def _server(request: Request) -> _Server:
    return request.app.state.server


router = APIRouter()
CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"

_HEALTH_503 = {
    "description": "Draining (shutting down), or the engine loop or a tensor-parallel worker is not running",
    "content": {"application/json": {"schema": {"anyOf": [{"$ref": "#/components/schemas/HealthStatus"},
                                                          {"$ref": "#/components/schemas/ErrorResponse"}]}}}}


@router.get("/health", response_model=None, responses={200: {"model": HealthStatus}, 503: _HEALTH_503})
@router.head("/health", response_model=None, operation_id="health_head",
             responses={200: {"description": "Healthy (no body)"}, 503: {"description": "Draining or dead"}})
async def health(request: Request) -> Response:
    """200 while the engine loop and its tensor-parallel workers run, 503 {"status": "draining"} while shutting
    down; open even with an API key."""
    server = _server(request)
    if not server.async_engine.is_running:
        raise OpenAIError(503, "the engine loop is not running", type="server_error", code="engine_dead")
    try:
        server.async_engine.engine.check_health()
    except WorkerDiedError as error:
        raise OpenAIError(503, str(error), type="server_error", code="worker_dead") from None
    if server.drain.is_draining:
        return JSONResponse({"status": "draining"}, status_code=503,
                            headers={"Retry-After": str(server.config.retry_after_s)})
    return JSONResponse({"status": "ok"})


@router.get("/metrics", response_class=PlainTextResponse,
            responses={200: {"description": "Prometheus text format", "content": {"text/plain": {}}}})
async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    return Response(_server(request).metrics.render(), media_type=CONTENT_TYPE)


@router.get("/v1/models")
async def models(request: Request) -> ModelList:
    """The one served model."""
    server = _server(request)
    return ModelList(data=[ModelCard(id=server.model_name, max_model_len=server.max_model_len)])


async def chat_job(server: _Server, body: ChatCompletionRequest) -> Job:
    """Chat: the conversation through the model's chat template, one answer per `n`."""
    model = server.check_model(body.model)
    try:
        params = body.sampling_params()
        plan = tool_plan(body)
        constrain(params, plan)
    except ValueError as error:
        raise invalid_request(error) from None
    server.admit(params.n)  # before tokenizing: an overloaded server should shed load cheaply
    try:
        messages = [message.for_template() for message in body.messages]
        server.length_guard.check(sum(len(m["content"]) for m in messages if isinstance(m.get("content"), str)),
                                  "messages")
        prompt_ids = await run_in_threadpool(server.input_processor.apply_chat_template, messages, plan.prompt_tools)
    except ValueError as error:
        raise invalid_request(error) from None
    response_id = f"chatcmpl-{uuid.uuid4().hex}"
    formatter = chat_formatter(plan, response_id, model, {response_id: 0}, server.token_text,
                               params.logprobs, body.include_usage, num_prompt_logprobs=body.prompt_logprobs)
    requests = [GenerateRequest(response_id, {"prompt_token_ids": prompt_ids}, params)]
    return Job(requests, formatter, params.n,
               {"prompt": "messages", "prompt_token_ids": "messages", "max_tokens": body.max_tokens_field,
                "structured_outputs": body.structured_outputs_field},
               server.response_cache.key(CHAT_PATH, body, params))


@router.post(CHAT_PATH, response_model=None,
             responses={200: {"model": ChatCompletionResponse, "content": sse(ChatCompletionChunk),
                              "description": "A chat.completion, or with `stream` chat.completion.chunk events"}})
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    """Chat: the conversation through the model's chat template, one answer per `n`."""
    server = _server(request)
    return await server.run(request, await chat_job(server, body), body.stream)


async def completion_job(server: _Server, body: CompletionRequest) -> Job:
    """Completions: a prompt, a list of prompts, or token ids; choices are numbered prompt by prompt."""
    model = server.check_model(body.model)
    try:
        params = body.sampling_params()
        prompts = body.prompts()
    except ValueError as error:
        raise invalid_request(error) from None
    server.admit(len(prompts) * params.n)
    try:
        for prompt in prompts:
            if isinstance(prompt, str):
                server.length_guard.check(len(prompt), "prompt")
        # Tokenized off the engine thread; the engine validates the ids (InputProcessor.process).
        encoded = await run_in_threadpool(lambda: [server.input_processor.tokenize(p) for p in prompts])
    except ValueError as error:
        raise invalid_request(error) from None
    response_id = f"cmpl-{uuid.uuid4().hex}"
    request_ids = [response_id if len(prompts) == 1 else f"{response_id}-{i}" for i in range(len(prompts))]
    formatter = CompletionFormatter(response_id, model, {rid: i * params.n for i, rid in enumerate(request_ids)},
                                    server.token_text, params.logprobs, body.include_usage,
                                    num_prompt_logprobs=body.prompt_logprobs, echo=body.echo,
                                    echo_only=body.echo_only)
    requests = [GenerateRequest(rid, {"prompt": text, "prompt_token_ids": ids}, params)
                for rid, (text, ids) in zip(request_ids, encoded, strict=True)]
    return Job(requests, formatter, len(prompts) * params.n,
               {"prompt_token_ids": "prompt", "structured_outputs": body.structured_outputs_field},
               server.response_cache.key(COMPLETIONS_PATH, body, params))


@router.post(COMPLETIONS_PATH, response_model=None,
             responses={200: {"model": CompletionResponse, "content": sse(CompletionResponse),
                              "description": "A text_completion, or with `stream` text_completion chunk events"}})
async def completions(body: CompletionRequest, request: Request) -> Response:
    """Completions: a prompt, a list of prompts, or token ids; choices are numbered prompt by prompt."""
    server = _server(request)
    return await server.run(request, await completion_job(server, body), body.stream)


def build_app(async_engine: AsyncEngine, metrics: ServerMetrics, config: ServerConfig,
              kv_connector: DecodeConnector | None = None) -> FastAPI:
    """A FastAPI app over a started AsyncEngine; several apps (say, with different keys) may share one."""
    app = FastAPI(title="kvserve", summary="OpenAI-compatible LLM server", version="0.1.0",
                  redirect_slashes=False)
    app.state.server = _Server(async_engine, metrics, config, kv_connector)
    install_error_handlers(app)
    install_openapi(app)
    app.include_router(router)
    app.include_router(tokenize_router)
    app.include_router(kv_view_router)
    install_playground(app)
    install_voice(app, config.tts, chat_job)  # /v1/voice and its socket
    app.include_router(audio_router)  # /v1/audio/transcriptions and /v1/audio/speech
    # The same requests over a WebSocket: /v1/chat/completions/ws and /v1/completions/ws.
    app.include_router(socket_router({CHAT_PATH: SocketEndpoint(ChatCompletionRequest, chat_job),
                                      COMPLETIONS_PATH: SocketEndpoint(CompletionRequest, completion_job)}))
    if config.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=config.api_key)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=config.max_request_body_bytes)
    app.add_middleware(StripTrailingSlashMiddleware)  # outermost: auth and routing see the normalized path
    return app


def serve(engine_config: EngineConfig, config: ServerConfig) -> None:
    """Load the engine, start its loop, and serve HTTP until interrupted."""
    import uvicorn

    metrics = ServerMetrics()
    async_engine = AsyncEngine.launch(engine_config, metrics)  # loaded and stepped on its own thread
    kv_connector = None
    if config.role is not None:  # prefill/decode disaggregation
        check_disaggregation(async_engine.engine)
        if config.role == "prefill":
            PrefillService(async_engine, config.kv_transfer_address)
        else:
            kv_connector = DecodeConnector(async_engine, config.kv_transfer_address)
    app = build_app(async_engine, metrics, config, kv_connector)
    # timeout_graceful_shutdown is the backstop after the drain's own aborts (a second signal skips the drain).
    uvicorn_config = uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level,
                                    timeout_graceful_shutdown=10, ws_max_size=config.max_request_body_bytes)
    try:
        DrainingServer(uvicorn_config, app.state.server.drain).run()
    finally:
        async_engine.shutdown()
