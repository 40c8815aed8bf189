"""Chat requests to a language model, and running them on any backend in Beam.

The captioner and the instruction writer both turn an element (an image, a pair) into a
`GenerationTask` holding a `ChatRequest`, run it on a backend and turn the `Generation` (in a
`GenerationResult`) back into a caption or instructions. A backend (`openai`, `vllm`,
`transformers`, and `template`, which writes from the pair itself without a model) only knows how
to load its model and generate text for a batch of tasks; it never raises for one bad request but
returns a failed `Generation` with a reason, so that one element never takes its batch down.

Model backends run in `RunInference(GenerationModelHandler(backend))` (inference.py: Beam's
RunInference imports torch, so it loads only for them); the template writer runs in
`GenerateInProcess`, a plain ParDo on batches with the same results and rejects.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import apache_beam as beam

from magiclens.pipeline.accounting import NAMESPACE, REJECTS_TAG, StageCounters


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


class GenerationResult(NamedTuple):
    """A task and its generation; the fields of Beam's PredictionResult, which RunInference emits."""

    example: GenerationTask
    inference: Generation
    model_id: str


def generate_batch(backend: GenerationBackend, model: Any, batch: Sequence[GenerationTask]) -> list[GenerationResult]:
    """One GenerationResult per task of `batch`; raises when the backend does not answer every task."""
    generations = backend.generate(model, batch)
    if len(generations) != len(batch):
        raise RuntimeError(f"{backend.backend_id} answered {len(generations)} of {len(batch)} requests")
    return [GenerationResult(task, generation, backend.backend_id) for task, generation in zip(batch, generations)]


class _GenerateBatches(beam.DoFn):
    """A batch of tasks -> a GenerationResult per task; a batch whose generation raises -> every task
    rejected as `inference_error`, as RejectFailedBatch rejects RunInference's dead letters."""

    def __init__(self, backend: GenerationBackend, stage: str):
        self.backend = backend
        self.stage = stage

    def setup(self):
        self.model = self.backend.load()
        self.counters = StageCounters(self.stage)

    def process(self, batch: list[GenerationTask]):
        try:
            results = generate_batch(self.backend, self.model, batch)
        except Exception as error:  # noqa: BLE001 - like RunInference's exception handling: the batch is rejected
            for task in batch:
                yield self.counters.reject(task.key, "inference_error", repr(error))
            return
        yield from results


class GenerateInProcess(beam.PTransform):
    """GenerationTasks -> {"generated": GenerationResults, REJECTS_TAG: failed batches} on a backend
    with no model to load and share (the rule-based template writer), without RunInference."""

    def __init__(self, backend: GenerationBackend, batch_size: int, stage: str):
        super().__init__()
        self.backend = backend
        self.batch_size = batch_size
        self.stage = stage

    def expand(self, tasks):
        return (
            tasks
            | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=self.batch_size)
            | "Generate" >> beam.ParDo(_GenerateBatches(self.backend, self.stage)).with_outputs(REJECTS_TAG, main="generated")
        )


class TokenCounters:
    """Prompt and completion tokens reported by a backend, as counters ROLE_tokens.prompt / .completion."""

    def __init__(self, role: str):
        self.prompt = beam.metrics.Metrics.counter(NAMESPACE, f"{role}_tokens.prompt")
        self.completion = beam.metrics.Metrics.counter(NAMESPACE, f"{role}_tokens.completion")

    def add(self, result: GenerationResult) -> None:
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
