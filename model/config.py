"""Model configurations: `tiny` (CPU tests and the demo), `base` (ViT-B/16) and `large` (ViT-L/14).

`base` and `large` are the two released MagicLens models: OpenAI CLIP backbones (QuickGELU, 224 px,
77 tokens) under a 4-layer fusion transformer and an attention pooler. The head sizes come from the
released inference code; the CLIP sizes from the OpenAI models.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from transformers import CLIPConfig

from magiclens.model.arguments import MODEL_NAMES
from magiclens.model.tokenizer import CONTEXT_LENGTH



@dataclass(frozen=True)
class HeadConfig:
    """The fusion transformer and the pooler that sit on the CLIP embeddings."""

    embed_dim: int  # D: CLIP's projection width, and the width of every head layer
    num_layers: int = 4
    num_heads: int = 8  # fusion layers and pooler alike
    # pooler attention width; the released models use 4 * embed_dim
    pooler_hidden_dim: int = 0
    num_query_tokens: int = 1

    def __post_init__(self) -> None:
        if self.pooler_hidden_dim == 0:
            object.__setattr__(self, "pooler_hidden_dim", 4 * self.embed_dim)

    @property
    def ffn_hidden_dim(self) -> int:
        return 4 * self.embed_dim


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a MagicLens model without its weights."""

    name: str
    head: HeadConfig
    clip: dict[str, Any] = field(repr=False)  # CLIPConfig.to_dict() of the backbone

    def clip_config(self) -> CLIPConfig:
        return CLIPConfig.from_dict(self.clip)

    @property
    def image_size(self) -> int:
        return int(self.clip_config().vision_config.image_size)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "head": asdict(self.head), "clip": self.clip}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return cls(name=data["name"], head=HeadConfig(**data["head"]), clip=data["clip"])


def _openai_clip(
    embed_dim: int,
    text_width: int,
    text_heads: int,
    vision_width: int,
    vision_layers: int,
    vision_heads: int,
    patch_size: int,
    image_size: int = 224,
    text_layers: int = 12,
) -> CLIPConfig:
    text = dict(
        vocab_size=49408,
        hidden_size=text_width,
        intermediate_size=4 * text_width,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        max_position_embeddings=CONTEXT_LENGTH,
        hidden_act="quick_gelu",
        projection_dim=embed_dim,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    vision = dict(
        hidden_size=vision_width,
        intermediate_size=4 * vision_width,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        hidden_act="quick_gelu",
        projection_dim=embed_dim,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=embed_dim)


HEADS = {
    # small enough to train on a CPU in seconds
    "tiny": HeadConfig(embed_dim=64, num_heads=4),
    "base": HeadConfig(embed_dim=512, num_heads=8),
    "large": HeadConfig(embed_dim=768, num_heads=16),
}


def default_clip_config(name: str) -> CLIPConfig:
    """The backbone of `name` with random weights: OpenAI CLIP ViT-B/16, ViT-L/14, or a tiny one."""
    if name == "base":
        return _openai_clip(512, 512, 8, 768, 12, 12, patch_size=16)
    if name == "large":
        return _openai_clip(768, 768, 12, 1024, 24, 16, patch_size=14)
    if name == "tiny":
        # the real vocabulary, so that the real tokenizer fits
        return _openai_clip(64, 64, 2, 64, 2, 2, patch_size=8, image_size=64, text_layers=2)
    raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}")


def model_config(name: str, clip: CLIPConfig | None = None) -> ModelConfig:
    """The configuration `name`; `clip` replaces the default backbone (a pretrained one's config)."""
    if name not in HEADS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}")
    head = HEADS[name]
    clip = clip or default_clip_config(name)
    if clip.projection_dim != head.embed_dim:
        raise ValueError(
            f"model {name!r} needs a CLIP backbone with {head.embed_dim}-d embeddings, "
            f"but the backbone has {clip.projection_dim}-d: pick the matching --model"
        )
    return ModelConfig(name=name, head=head, clip=clip.to_dict())
