"""The `vllm` backend: vLLM's offline engine (`vllm.LLM`) on the worker's GPUs.

An optional extra (`pip install .[vllm]`). The engine is loaded once per worker process and takes
all the GPUs it is given (`--vllm-arg tensor_parallel_size=N`), so run one SDK process per GPU
machine (Dataflow: `--experiments=no_use_multiple_sdk_containers`; locally the default
single-process runner). Each batch goes to `LLM.chat` as one call, which applies the model's chat
template and schedules the requests together. Messages use the OpenAI format, images
as data URLs, which vLLM's chat entry point reads for multimodal models (the captioner).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from magiclens.pipeline.writers.chat import ChatRequest, Generation, GenerationTask, message_payload

MISSING_VLLM = (
    "the vllm backend needs the vllm package, which is not installed: run `pip install '.[vllm]'` "
    "(or `pip install vllm`) on a machine with a GPU, or use --writer openai against a `vllm serve` endpoint"
)


def engine_arguments(pairs: Sequence[str] | None) -> dict[str, Any]:
    """--vllm-arg KEY=VALUE options as keyword arguments of vllm.LLM; values are read as JSON when they parse."""
    arguments: dict[str, Any] = {}
    for item in pairs or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--vllm-arg {item!r}: expected KEY=VALUE, e.g. --vllm-arg tensor_parallel_size=2")
        try:
            arguments[key.strip().replace("-", "_")] = json.loads(value)
        except ValueError:
            arguments[key.strip().replace("-", "_")] = value
    return arguments


def chat_arguments(requests: Sequence[ChatRequest]) -> tuple[list[list[dict]], list[dict]]:
    """The conversations and per-request sampling parameters (keyword arguments of SamplingParams) of a batch."""
    conversations = [[message_payload(m) for m in request.messages] for request in requests]
    sampling = [
        {"temperature": r.temperature, "top_p": r.top_p, "max_tokens": r.max_tokens, "seed": r.seed} for r in requests
    ]
    return conversations, sampling


def import_vllm() -> Any:
    try:
        import vllm
    except ImportError as error:
        raise SystemExit(MISSING_VLLM) from error
    return vllm


@dataclass
class VLLMBackend:
    model: str
    engine_args: dict = field(default_factory=dict)

    @property
    def backend_id(self) -> str:
        return f"vllm:{self.model}"

    def load(self) -> Any:
        vllm = import_vllm()
        return vllm.LLM(model=self.model, **self.engine_args)

    def generate(self, llm: Any, tasks: Sequence[GenerationTask]) -> list[Generation]:
        vllm = import_vllm()
        conversations, sampling = chat_arguments([task.request for task in tasks])
        outputs = llm.chat(conversations, sampling_params=[vllm.SamplingParams(**s) for s in sampling], use_tqdm=False)
        return [
            Generation(
                output.outputs[0].text,
                prompt_tokens=len(output.prompt_token_ids or ()),
                completion_tokens=len(output.outputs[0].token_ids or ()),
            )
            for output in outputs
        ]
