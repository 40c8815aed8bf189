"""Instruction writers: given a pair (query and target image with their text), write instructions.

Every writer runs as a generation backend (see `chat.py`): `template` (rule-based, `template.py`,
in a plain ParDo), and in Beam's `RunInference` the model backends `openai`, `vllm` and `transformers`, which
follow a versioned prompt (`prompt.py`) and whose answers are checked (`validate.py`). A writer has
an id (`writer`, recorded in every triplet) and the id of the prompt it follows (`prompt_id` =
name@version). `WriterRejected` carries the reason an element gets no output.

This module is the registry: the backend names and `make_backend`, which imports a backend's module
only when that backend is asked for (so vllm, transformers and aiohttp load only where used).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from magiclens.pipeline.writers.chat import GenerationBackend

LLM_BACKENDS = ("openai", "vllm", "transformers")
WRITER_BACKENDS = ("template", *LLM_BACKENDS)
CAPTIONER_BACKENDS = ("none", *LLM_BACKENDS)


class WriterRejected(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail



@dataclass(frozen=True)
class BackendConfig:
    """Everything needed to build one backend, for the "writer" or the "captioner" role."""

    name: str
    role: str
    model: str | None = None
    endpoint: str | None = None  # openai
    api_key_env: str = "OPENAI_API_KEY"  # openai: read on the workers, never pickled
    concurrency: int = 8  # openai
    max_retries: int = 5  # openai
    request_timeout_s: float = 120.0  # openai, per attempt
    request_deadline_s: float = 300.0  # openai, per request: every attempt and wait
    max_answer_bytes: int = 1_000_000  # openai
    retry_backoff_s: float = 1.0  # openai
    vllm_args: tuple[str, ...] = ()  # vllm: KEY=VALUE engine arguments
    device: str = "auto"  # transformers
    instructions_per_pair: int = 1  # template


def make_backend(config: BackendConfig) -> GenerationBackend:
    """The backend `config.name`, configured for its role; SystemExit with what to do when it cannot be."""
    name, role = config.name, config.role
    if name == "template" and role == "writer":
        from magiclens.pipeline.writers.template import TemplateBackend

        return TemplateBackend(count=config.instructions_per_pair)
    available = WRITER_BACKENDS if role == "writer" else LLM_BACKENDS
    if name not in LLM_BACKENDS:
        raise SystemExit(f"unknown {role} backend {name!r}; available: {', '.join(available)}")
    if not config.model:
        flag = "--caption-model or --model" if role == "captioner" else "--model"
        raise SystemExit(f"--{role} {name} needs {flag}: the model to run (a served model name, a local path or a hub id)")
    if name == "openai":
        from magiclens.pipeline.writers.openai import OpenAIBackend

        if not config.endpoint:
            raise SystemExit(f"--{role} openai needs --endpoint URL (for example http://127.0.0.1:8000/v1)")
        return OpenAIBackend(
            endpoint=config.endpoint,
            model=config.model,
            api_key_env=config.api_key_env,
            concurrency=config.concurrency,
            max_retries=config.max_retries,
            timeout_s=config.request_timeout_s,
            backoff_s=config.retry_backoff_s,
            deadline_s=config.request_deadline_s,
            max_response_bytes=config.max_answer_bytes,
        )
    if name == "vllm":
        from magiclens.pipeline.writers.vllm import VLLMBackend, engine_arguments

        return VLLMBackend(model=config.model, engine_args=engine_arguments(config.vllm_args))
    from magiclens.pipeline.writers.transformers import TransformersBackend

    return TransformersBackend(model=config.model, device=config.device, vision=role == "captioner")
