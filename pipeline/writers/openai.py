"""The `openai` backend: any OpenAI-compatible chat completions endpoint (`vllm serve`, SGLang, a hosted API).

Requests of a batch run concurrently (at most `concurrency` at once per worker process); the
statuses of the project's one retry policy (pipeline/retry.py: 408, 409, 425, 429, most 5xx),
timeouts and dropped connections are retried with exponential backoff and jitter, honouring a
Retry-After header (a server that asks for a wait over a minute is given up on). Each attempt
has its own timeout (`timeout_s`), and the whole request, attempts and waits together, a deadline
(`deadline_s`): a server that accepts connections and never answers costs one deadline, not one
timeout per retry. An answer is read up to `max_response_bytes` (after HTTP decompression) and
given up on past it, so that a server streaming without end cannot fill the worker's memory. A
request that still fails gives a failed Generation with the reason (http_500, timeout,
deadline_exceeded, response_too_large, ...), never an exception, so its element is rejected and
the rest of the batch goes on. The API key is read from an environment
variable on the worker when the backend loads, so it never travels inside the pickled pipeline; an
unset variable means no key (local servers).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

import aiohttp

from magiclens.pipeline.retry import RetryPolicy, is_retryable_status, parse_retry_after
from magiclens.pipeline.writers.chat import ChatRequest, Generation, GenerationTask, message_payload
from magiclens.pipeline.writers.validate import raw_output

MAX_WAIT_S = 60.0  # the longest wait between two attempts, ours or asked by the server (Retry-After)
# A chat answer of the project's prompts is a few kB of JSON; 1 MB leaves room for any prompt.
MAX_RESPONSE_BYTES = 1_000_000
_READ_CHUNK = 64 * 1024


def request_payload(model: str, request: ChatRequest) -> dict:
    """The JSON body of a chat completions request."""
    return {
        "model": model,
        "messages": [message_payload(m) for m in request.messages],
        "temperature": request.temperature,
        "top_p": request.top_p,
        "max_tokens": request.max_tokens,
        "seed": request.seed,
        "response_format": {"type": "json_object"},  # every prompt asks for one JSON object
    }


def generation_from_response(body: dict) -> Generation:
    """The text and token usage of a chat completions response."""
    try:
        text = body["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return Generation(None, "bad_response", raw_output(json.dumps(body)))
    if not isinstance(text, str):
        return Generation(None, "bad_response", raw_output(json.dumps(body)))
    usage = body.get("usage") or {}
    return Generation(text, prompt_tokens=int(usage.get("prompt_tokens") or 0), completion_tokens=int(usage.get("completion_tokens") or 0))


@dataclass(frozen=True)
class OpenAIClient:
    """What `load` gives: where to send requests, with the key read on the worker."""

    url: str
    headers: dict


@dataclass
class OpenAIBackend:
    endpoint: str  # the API base, e.g. http://127.0.0.1:8000/v1
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8
    max_retries: int = 5
    timeout_s: float = 120.0  # per attempt
    backoff_s: float = 1.0
    deadline_s: float = 300.0  # per request, from when it may start: every attempt and every wait
    max_response_bytes: int = MAX_RESPONSE_BYTES

    def __post_init__(self) -> None:
        for name in ("timeout_s", "deadline_s", "max_response_bytes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"OpenAIBackend {name} must be positive, got {getattr(self, name)}")

    @property
    def backend_id(self) -> str:
        return f"openai:{self.model}"

    def load(self) -> OpenAIClient:
        headers = {"Content-Type": "application/json", "User-Agent": "magiclens-instruct"}
        key = os.environ.get(self.api_key_env, "") if self.api_key_env else ""
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return OpenAIClient(url=self.endpoint.rstrip("/") + "/chat/completions", headers=headers)

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(
            retries=self.max_retries, backoff=self.backoff_s, max_backoff=MAX_WAIT_S, max_retry_after=MAX_WAIT_S
        )

    def generate(self, client: OpenAIClient, tasks: Sequence[GenerationTask]) -> list[Generation]:
        return asyncio.run(self._generate_all(client, [task.request for task in tasks]))

    async def _generate_all(self, client: OpenAIClient, requests: Sequence[ChatRequest]) -> list[Generation]:
        limit = asyncio.Semaphore(self.concurrency)
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with aiohttp.ClientSession(headers=client.headers, timeout=timeout) as session:

            async def one(request: ChatRequest) -> Generation:
                async with limit:
                    return await self._post_with_retries(session, client.url, request_payload(self.model, request))

            return list(await asyncio.gather(*(one(r) for r in requests)))

    async def _post_with_retries(self, session: aiohttp.ClientSession, url: str, payload: dict) -> Generation:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.deadline_s
        policy = self.retry_policy()
        failure = Generation(None, "request_failed")
        for attempt in itertools.count():  # ends when the policy or the deadline says no more
            try:
                async with asyncio.timeout_at(deadline):
                    outcome, retryable, retry_after = await self._attempt(session, url, payload)
            except TimeoutError:
                return self._past_deadline(url, attempt + 1, failure)
            if not retryable:
                return outcome
            failure = outcome
            delay = policy.delay(attempt, retry_after)
            if delay is None:
                if attempt < policy.retries:
                    wait = f"Retry-After {retry_after:g} s is over {MAX_WAIT_S:g} s"
                    failure = replace(failure, detail=f"{failure.detail}; {wait}" if failure.detail else wait)
                return failure
            if loop.time() + delay >= deadline:  # the wait alone would end past the deadline
                return self._past_deadline(url, attempt + 1, failure)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable: the retry policy ends every loop")

    async def _attempt(
        self, session: aiohttp.ClientSession, url: str, payload: dict
    ) -> tuple[Generation, bool, float | None]:
        """One POST: its outcome, whether another attempt may do better, and the server's Retry-After."""
        try:
            async with session.post(url, json=payload) as response:
                body = await self._read_capped(response)
                if body is None:
                    detail = f"HTTP {response.status} answer over {self.max_response_bytes} bytes from {url}"
                    return Generation(None, "response_too_large", detail), False, None
                if response.status == 200:
                    return _generation_from_body(body), False, None
                failure = Generation(None, f"http_{response.status}", raw_output(body.decode("utf-8", "replace")))
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                return failure, is_retryable_status(response.status), retry_after
        except asyncio.TimeoutError:  # this attempt's own timeout (the deadline cancels instead)
            return Generation(None, "timeout", f"no answer within {self.timeout_s} s from {url}"), True, None
        except aiohttp.ClientError as error:
            return Generation(None, "connection_error", f"{type(error).__name__}: {error}"[:300]), True, None

    def _past_deadline(self, url: str, attempts: int, last: Generation) -> Generation:
        detail = f"no answer from {url} within the deadline of {self.deadline_s:g} s ({attempts} attempts)"
        if last.failure != "request_failed":
            detail += f"; last attempt: {last.failure} {last.detail or ''}".rstrip()
        return Generation(None, "deadline_exceeded", raw_output(detail))

    async def _read_capped(self, response: aiohttp.ClientResponse) -> bytes | None:
        """The body, or None when it is longer than max_response_bytes (declared or as read)."""
        if response.content_length is not None and response.content_length > self.max_response_bytes:
            return None
        body = bytearray()
        async for chunk in response.content.iter_chunked(_READ_CHUNK):
            body += chunk
            if len(body) > self.max_response_bytes:
                return None
        return bytes(body)


def _generation_from_body(body: bytes) -> Generation:
    try:
        return generation_from_response(json.loads(body))
    except (ValueError, RecursionError):  # not JSON, or nested too deeply for the parser
        return Generation(None, "bad_response", raw_output(body.decode("utf-8", "replace")))
