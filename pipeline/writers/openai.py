"""The `openai` backend: any OpenAI-compatible chat completions endpoint (`vllm serve`, SGLang, a hosted API).

Requests of a batch run concurrently (at most `concurrency` at once per worker process); 429, 5xx,
timeouts and dropped connections are retried with exponential backoff and jitter, honouring a
Retry-After header. A request that still fails gives a failed Generation with the reason (http_500,
timeout, ...), never an exception, so its element is rejected and the rest of the batch goes on.
The API key is read from an environment variable on the worker when the backend loads, so it
never travels inside the pickled pipeline; an unset variable means no key (local servers).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp

from magiclens.pipeline.writers.chat import ChatMessage, ChatRequest, Generation, GenerationTask
from magiclens.pipeline.writers.validate import raw_output

RETRIED_STATUSES = frozenset({408, 409, 425, 429}) | frozenset(range(500, 600))
MAX_BACKOFF_S = 60.0


def image_data_url(image: bytes) -> str:
    """An image as a data URL (OpenAI's way to send images inline); the type is sniffed from its bytes."""
    if image.startswith(b"\x89PNG"):
        mime = "image/png"
    elif image[:4] == b"RIFF" and image[8:12] == b"WEBP":
        mime = "image/webp"
    else:
        mime = "image/jpeg"  # what the mining stage writes
    return f"data:{mime};base64,{base64.b64encode(image).decode('ascii')}"


def message_payload(message: ChatMessage) -> dict:
    """One message in the chat completions format: plain text, or parts when it carries images."""
    if not message.images:
        return {"role": message.role, "content": message.text}
    parts: list[dict] = [{"type": "image_url", "image_url": {"url": image_data_url(image)}} for image in message.images]
    parts.append({"type": "text", "text": message.text})
    return {"role": message.role, "content": parts}


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


def retry_delay(attempt: int, backoff_s: float, retry_after: str | None) -> float:
    """Seconds to wait before retry number `attempt` (0-based): the server's Retry-After, else jittered exponential."""
    if retry_after:
        try:
            return min(max(float(retry_after), 0.0), MAX_BACKOFF_S)
        except ValueError:
            pass  # an HTTP date: fall back to our own backoff
    return min(backoff_s * 2**attempt, MAX_BACKOFF_S) * random.uniform(0.5, 1.0)


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
    timeout_s: float = 120.0
    backoff_s: float = 1.0

    @property
    def backend_id(self) -> str:
        return f"openai:{self.model}"

    def load(self) -> OpenAIClient:
        headers = {"Content-Type": "application/json", "User-Agent": "magiclens-instruct"}
        key = os.environ.get(self.api_key_env, "") if self.api_key_env else ""
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return OpenAIClient(url=self.endpoint.rstrip("/") + "/chat/completions", headers=headers)

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
        failure = Generation(None, "request_failed")
        for attempt in range(self.max_retries + 1):
            retry_after = None
            try:
                async with session.post(url, json=payload) as response:
                    body = await response.text()
                    if response.status == 200:
                        try:
                            return generation_from_response(json.loads(body))
                        except ValueError:
                            return Generation(None, "bad_response", raw_output(body))
                    failure = Generation(None, f"http_{response.status}", raw_output(body))
                    if response.status not in RETRIED_STATUSES:
                        return failure
                    retry_after = response.headers.get("Retry-After")
            except asyncio.TimeoutError:
                failure = Generation(None, "timeout", f"no answer within {self.timeout_s} s from {url}")
            except aiohttp.ClientError as error:
                failure = Generation(None, "connection_error", f"{type(error).__name__}: {error}"[:300])
            if attempt < self.max_retries:
                await asyncio.sleep(retry_delay(attempt, self.backoff_s, retry_after))
        return failure
