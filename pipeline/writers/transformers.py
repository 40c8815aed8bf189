"""The `transformers` backend: local generation with a Hugging Face model, on CPU or GPU.

The writer loads a causal language model with its tokenizer; the captioner loads an
image-text-to-text model with its processor. Both format requests with the model's own chat
template, pad on the left and generate a batch at a time. The model comes from a local directory
or a hub id; nothing is downloaded unless the user names a hub id that is not cached.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from magiclens.pipeline.writers.chat import ChatMessage, ChatRequest, Generation, GenerationTask


def text_conversation(request: ChatRequest) -> list[dict]:
    return [{"role": m.role, "content": m.text} for m in request.messages]


def vision_conversation(request: ChatRequest) -> list[dict]:
    """Messages in the processor chat format, images decoded to PIL (what processors take)."""
    from PIL import Image

    def content(message: ChatMessage) -> list[dict]:
        parts = [{"type": "image", "image": Image.open(io.BytesIO(data)).convert("RGB")} for data in message.images]
        return parts + [{"type": "text", "text": message.text}]

    return [{"role": m.role, "content": content(m)} for m in request.messages]


@dataclass(frozen=True)
class LoadedModel:
    model: Any
    tokenizer: Any  # for the captioner, the processor's tokenizer
    processor: Any  # the processor (captioner) or the tokenizer (writer): what applies the chat template
    device: str


@dataclass
class TransformersBackend:
    model: str
    device: str = "auto"  # auto: cuda when available, else cpu
    vision: bool = False  # an image-text-to-text model (the captioner) rather than a causal LM

    @property
    def backend_id(self) -> str:
        return f"transformers:{self.model}"

    def load(self) -> LoadedModel:
        import torch
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        processor = AutoProcessor.from_pretrained(self.model) if self.vision else AutoTokenizer.from_pretrained(self.model)
        if getattr(processor, "chat_template", None) is None:
            raise SystemExit(
                f"model {self.model} has no chat template: use an instruction-tuned (chat) model, "
                "or add a chat_template to its tokenizer or processor config"
            )
        tokenizer = processor.tokenizer if self.vision else processor
        model_class = AutoModelForImageTextToText if self.vision else AutoModelForCausalLM
        model = model_class.from_pretrained(self.model)
        tokenizer.padding_side = "left"  # generation continues at the right edge of every row
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.to(device).eval()
        return LoadedModel(model, tokenizer, processor, device)

    def generate(self, loaded: LoadedModel, tasks: Sequence[GenerationTask]) -> list[Generation]:
        requests = [task.request for task in tasks]
        # Requests of one prompt share their sampling parameters; group them anyway so none is ignored.
        groups: dict[tuple, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault((request.temperature, request.top_p, request.max_tokens), []).append(index)
        generations: list[Generation | None] = [None] * len(requests)
        for indexes in groups.values():
            for index, generation in zip(indexes, self._generate_group(loaded, [requests[i] for i in indexes])):
                generations[index] = generation
        return generations  # type: ignore[return-value]

    def _generate_group(self, loaded: LoadedModel, requests: list[ChatRequest]) -> list[Generation]:
        import torch

        conversation = vision_conversation if self.vision else text_conversation
        options: dict[str, Any] = {"processor_kwargs": {"padding": True}} if self.vision else {"padding": True}
        inputs = loaded.processor.apply_chat_template(
            [conversation(r) for r in requests],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            **options,
        ).to(loaded.device)
        first = requests[0]
        torch.manual_seed(first.seed)  # one seed per batch: generate() samples the rows together
        sampling = {"do_sample": True, "temperature": first.temperature, "top_p": first.top_p} if first.temperature > 0 else {"do_sample": False}
        with torch.inference_mode():
            output = loaded.model.generate(
                **inputs, max_new_tokens=first.max_tokens, pad_token_id=loaded.tokenizer.pad_token_id, **sampling
            )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        texts = loaded.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        stops = {loaded.tokenizer.pad_token_id, loaded.tokenizer.eos_token_id} - {None}
        completion_tokens = [sum(1 for t in row.tolist() if t not in stops) for row in new_tokens]
        return [
            Generation(text, prompt_tokens=int(p), completion_tokens=int(c))
            for text, p, c in zip(texts, prompt_tokens, completion_tokens)
        ]
