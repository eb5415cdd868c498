"""The one place that decides whether a request stops: stop strings, EOS, stop token ids, max_tokens."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvserve.engine.request import Request, RequestStatus


@dataclass(frozen=True)
class StopStringMatch:
    """Where the detokenizer found a stop string in a request's output text."""

    index: int  # the stop string's first character in the text
    stop: str


# Called once per appended token: the finished state that token puts the request in, or None.
StopCheck = Callable[[Request], RequestStatus | None]


def check_stop(request: Request, stop_string: StopStringMatch | None = None) -> RequestStatus | None:
    """The finished state the request's newest token puts it in, setting `request.stop_reason`; None to go on.

    `stop_string`: a stop string that token's text completed. Stop strings, EOS (unless ignore_eos) and stop
    token ids count from min_tokens generated tokens on (as in vLLM); a stop string also names the reason when
    the same token reaches max_tokens.
    """
    params = request.sampling_params
    if request.num_output_tokens >= params.min_tokens:
        if stop_string is not None:
            request.stop_reason = stop_string.stop
            return RequestStatus.FINISHED_STOPPED
        last = request.output_token_ids[-1]
        if not params.ignore_eos and last in request.eos_token_ids:
            request.stop_reason = None
            return RequestStatus.FINISHED_STOPPED
        if last in params.stop_token_ids:
            request.stop_reason = last
            return RequestStatus.FINISHED_STOPPED
    if request.num_output_tokens >= request.max_tokens:
        return RequestStatus.FINISHED_LENGTH
    return None
