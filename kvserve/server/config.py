"""ServerConfig: the server's options; `kvserve serve` flags are derived from its fields."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ServerConfig:
    """Options of the HTTP server (the engine's are EngineConfig)."""

    host: str = field(default="127.0.0.1", metadata={
        "help": "address to bind; the default keeps the server private to this machine"})
    port: int = field(default=8000, metadata={"help": "TCP port"})
    api_key: str | None = field(default=None, metadata={
        "help": "require 'Authorization: Bearer KEY' on /v1/* (default: $KVSERVE_API_KEY)"})
    served_model_name: str | None = field(default=None, metadata={
        "help": "the model name clients send (default: the model file's name)"})
    max_waiting_requests: int = field(default=256, metadata={
        "help": "sequences that may wait for a slot; past it, new requests get 503 + Retry-After"})
    retry_after_s: int = field(default=1, metadata={"help": "Retry-After seconds sent with a 503"})
    max_request_body_bytes: int = field(default=4 * 2**20, metadata={
        "help": "largest request body accepted; a larger one gets 413 before it is read in full"})
    drain_timeout_s: float = field(default=30.0, metadata={
        "help": "on SIGTERM: seconds the requests in flight may go on (new ones get 503) before they are aborted"})
    log_level: str = field(default="info", metadata={"help": "uvicorn log level"})
    response_cache_size: int = field(default=0, metadata={
        "help": "whole responses of deterministic requests (temperature 0, or a seed) to keep and replay; "
                "least recently used out first; 0 disables"})
    tts: str = field(default="espeak-ng", metadata={
        "help": "voice mode's text-to-speech engine: 'espeak-ng' (the Debian program) or 'piper' (better "
                "sounding, slower; pip install 'kvserve[piper]')"})
    role: str | None = field(default=None, metadata={
        "help": "prefill/decode disaggregation: 'decode' serves requests and takes their prompts' KV blocks from "
                "a 'prefill' instance, which computes them; unset: a plain server"})
    kv_transfer_address: str = field(default="127.0.0.1:29700", metadata={
        "help": "with --role: HOST:PORT of the KV transfer link (torch.distributed gloo), hosted by the decode "
                "instance; the prefill instance connects to it"})

    def __post_init__(self) -> None:
        if self.tts not in ("espeak-ng", "piper"):
            raise ValueError(f"tts must be 'espeak-ng' or 'piper', got {self.tts!r}")
        if self.role not in (None, "prefill", "decode"):
            raise ValueError(f"role must be 'prefill' or 'decode', got {self.role!r}")
        port = self.kv_transfer_address.rpartition(":")[2]
        if not (port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(f"kv_transfer_address must be HOST:PORT, got {self.kv_transfer_address!r}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_waiting_requests < 0:
            raise ValueError(f"max_waiting_requests must be >= 0, got {self.max_waiting_requests}")
        if self.max_request_body_bytes <= 0:
            raise ValueError(f"max_request_body_bytes must be > 0, got {self.max_request_body_bytes}")
        if not self.drain_timeout_s >= 0:
            raise ValueError(f"drain_timeout_s must be >= 0, got {self.drain_timeout_s}")
        if self.retry_after_s < 0:
            raise ValueError(f"retry_after_s must be >= 0, got {self.retry_after_s}")
        if self.response_cache_size < 0:
            raise ValueError(f"response_cache_size must be >= 0, got {self.response_cache_size}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty")
