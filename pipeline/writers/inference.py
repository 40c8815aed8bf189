"""The Beam `ModelHandler` that runs GenerationTasks on a model backend inside `RunInference`.

Apart from chat.py because Beam's RunInference module imports torch: the template writer, which
runs without it, never loads this module.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from apache_beam.ml.inference.base import ModelHandler

from magiclens.pipeline.writers.chat import GenerationBackend, GenerationResult, GenerationTask, generate_batch


class GenerationModelHandler(ModelHandler[GenerationTask, GenerationResult, Any]):
    """Runs GenerationTasks on a backend inside `RunInference` (batching, one model per process)."""

    def __init__(self, backend: GenerationBackend, batch_size: int, metrics_namespace: str):
        super().__init__(min_batch_size=1, max_batch_size=batch_size)
        self.backend = backend
        self.metrics_namespace = metrics_namespace

    def load_model(self) -> Any:
        return self.backend.load()

    def run_inference(
        self, batch: Sequence[GenerationTask], model: Any, inference_args: dict | None = None
    ) -> Iterable[GenerationResult]:
        return generate_batch(self.backend, model, batch)

    def get_num_bytes(self, batch: Sequence[GenerationTask]) -> int:
        return sum(
            len(m.text) + sum(len(i) for i in m.images) for task in batch if task.request for m in task.request.messages
        )

    def get_metrics_namespace(self) -> str:
        return self.metrics_namespace
