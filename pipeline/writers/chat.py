"""Chat requests to a language model and the Beam `ModelHandler` that runs them on any backend.

The captioner and the instruction writer both turn an element (an image, a pair) into a
`GenerationTask` holding a `ChatRequest`, run it through `RunInference(GenerationModelHandler(backend))`
and turn the `Generation` back into a caption or instructions. A backend (`openai`, `vllm`,
`transformers`, and `template`, which writes from the pair itself without a model) only knows how
to load its model and generate text for a batch of tasks; it never raises for one bad request but
returns a failed `Generation` with a reason, so that one element never takes its batch down.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import apache_beam as beam
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from magiclens.pipeline.accounting import NAMESPACE, StageCounters

@dataclass(frozen=True)
class ChatMessage:
    role: str  # "system", "user" or "assistant"
    text: str
    images: tuple[bytes, ...] = ()  # encoded images (JPEG), shown to the model before the text


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[ChatMessage, ...]
    temperature: float
    top_p: float
    max_tokens: int
    seed: int


@dataclass(frozen=True)
class Generation:
    """What a backend answered to one request: text, or the reason it has none."""

    text: str | None
    failure: str = ""  # snake_case reason when text is None: http_500, timeout, ...
    detail: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class GenerationTask:
    """One request and what to carry through inference untouched (the pair, the image hash)."""

    key: str
    request: ChatRequest | None  # None for the template writer, which needs no prompt
    payload: Any = None


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
    """One message in the OpenAI chat format, which the openai and vllm backends both send: plain
    text, or parts when it carries images."""
    if not message.images:
        return {"role": message.role, "content": message.text}
    parts: list[dict] = [{"type": "image_url", "image_url": {"url": image_data_url(image)}} for image in message.images]
    parts.append({"type": "text", "text": message.text})
    return {"role": message.role, "content": parts}


class GenerationBackend(Protocol):
    backend_id: str  # "backend:model", recorded in triplets and in the caption cache

    def load(self) -> Any:
        """Load the model or open the client; called once per worker process."""
        ...

    def generate(self, model: Any, tasks: Sequence[GenerationTask]) -> list[Generation]:
        """One Generation per task, in order."""
        ...


class GenerationModelHandler(ModelHandler[GenerationTask, PredictionResult, Any]):
    """Runs GenerationTasks on a backend inside `RunInference` (batching, one model per process)."""

    def __init__(self, backend: GenerationBackend, batch_size: int, metrics_namespace: str):
        super().__init__(min_batch_size=1, max_batch_size=batch_size)
        self.backend = backend
        self.metrics_namespace = metrics_namespace

    def load_model(self) -> Any:
        return self.backend.load()

    def run_inference(
        self, batch: Sequence[GenerationTask], model: Any, inference_args: dict | None = None
    ) -> Iterable[PredictionResult]:
        generations = self.backend.generate(model, batch)
        if len(generations) != len(batch):
            raise RuntimeError(f"{self.backend.backend_id} answered {len(generations)} of {len(batch)} requests")
        return [PredictionResult(task, generation, self.backend.backend_id) for task, generation in zip(batch, generations)]

    def get_num_bytes(self, batch: Sequence[GenerationTask]) -> int:
        return sum(
            len(m.text) + sum(len(i) for i in m.images) for task in batch if task.request for m in task.request.messages
        )

    def get_metrics_namespace(self) -> str:
        return self.metrics_namespace


class TokenCounters:
    """Prompt and completion tokens reported by a backend, as counters ROLE_tokens.prompt / .completion."""

    def __init__(self, role: str):
        self.prompt = beam.metrics.Metrics.counter(NAMESPACE, f"{role}_tokens.prompt")
        self.completion = beam.metrics.Metrics.counter(NAMESPACE, f"{role}_tokens.completion")

    def add(self, result: PredictionResult) -> None:
        if result.inference.prompt_tokens or result.inference.completion_tokens:  # backends without a model report none
            self.prompt.inc(result.inference.prompt_tokens)
            self.completion.inc(result.inference.completion_tokens)


class RejectFailedBatch(beam.DoFn):
    """RunInference's dead letters (a batch whose inference raised): every task in it, rejected."""

    def __init__(self, stage: str):
        self.stage = stage

    def setup(self):
        self.counters = StageCounters(self.stage)

    def process(self, failed):
        batch, (_error_type, error, _traceback) = failed
        for task in batch:
            yield self.counters.reject(task.key, "inference_error", error)  # error is the exception's repr
