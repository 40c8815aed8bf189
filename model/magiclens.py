"""MagicLens in PyTorch, layer for layer as the released (Flax) inference code defines it.

    image ─ CLIP vision ─ projection ─┐
                                      ├─ 2-token sequence ─ 4 fusion layers ─ attention pooler ─ L2 norm
    text  ─ CLIP text   ─ projection ─┘

Module and parameter names follow the Flax parameter tree so that a converter maps them one to one:

    clip.*                                         the Hugging Face CLIPModel (OpenAI, QuickGELU)
    multimodal_encoder.x_layers.{i}.layer_norm.{scale,bias}
        .self_attention.{query,key,value,post}.{weight,bias}
        .ff_layer.layer_norm.{scale,bias}
        .ff_layer.ffn_layer1.{weight,bias}         Flax ffn_layer1.linear.w (transposed), ffn_layer1.bias.b
        .ff_layer.ffn_layer2.{weight,bias}
    contrastive_multimodal_pooler.pooling_attn_query
        .pool_attn.{query,key,value,post}.{weight,bias}
        .pool_attn.per_dim_scale.per_dim_scale
        .pool_attn_ln.{scale,bias}

Flax keeps attention projections as w[D, heads, head_dim] and b[heads, head_dim]; here they are
nn.Linear: query/key/value weight = w.reshape(D, -1).T, bias = b.reshape(-1); post weight =
w.reshape(D, -1) (its einsum is "...NH,DNH->...D"), bias = b.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPModel, PreTrainedTokenizerBase

from magiclens.model.config import HeadConfig, ModelConfig
from magiclens.model.tokenizer import tokenize

LOGIT_CAP = 50.0
# 1 / softplus(0): with per_dim_scale at 0 the query scale would be exactly 1 / sqrt(head_dim)
R_SOFTPLUS_0 = 1.442695041
# The standard deviation of a unit normal truncated to [-2, 2]: Flax's lecun_normal widens its
# normal by 1 / this, so that after truncation at two deviations the variance is 1 / fan_in.
_TRUNCATED_UNIT_STD = 0.87962566103423978

# Initial values below follow google-deepmind/magiclens layers.py at commit 5135f58be020: they
# matter only when training from scratch, since released or trained weights replace them.


def _lecun_normal_(tensor: torch.Tensor, fan_in: int) -> torch.Tensor:
    """Flax's lecun_normal: variance 1 / fan_in, truncated at two standard deviations."""
    std = fan_in**-0.5 / _TRUNCATED_UNIT_STD
    return nn.init.trunc_normal_(tensor, std=std, a=-2 * std, b=2 * std)


def _linear(in_features: int, out_features: int, fan_in: int | None = None) -> nn.Linear:
    """A Linear initialised as the released layers are: lecun_normal weight, zero bias."""
    linear = nn.Linear(in_features, out_features)
    _lecun_normal_(linear.weight, fan_in or in_features)
    nn.init.zeros_(linear.bias)
    return linear


class LayerNorm(nn.Module):
    """y = normalize(x) * (1 + scale) + bias, eps 1e-6: the weight is stored as an offset from 1.

    `scale` starts at 1, so the initial weight is 2, as in the released code (layers.py line 41:
    the scale's initializer is `ones` while the forward multiplies by 1 + scale).
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.scale.shape, 1 + self.scale, self.bias, self.eps)


class PerDimScale(nn.Module):
    """Scales queries by 1.442695041 / sqrt(head_dim) * softplus(per_dim_scale), per dimension.

    `per_dim_scale` starts at 1, as in the released code (layers.py line 218: initializer `ones`),
    so the initial scale is softplus(1) / softplus(0) = 1.899 times 1 / sqrt(head_dim).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.per_dim_scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = R_SOFTPLUS_0 / math.sqrt(x.shape[-1]) * F.softplus(self.per_dim_scale)
        return x * scale.to(x.dtype)


class DotProductAttention(nn.Module):
    """Multi-head attention with soft-capped logits: 50 * tanh(logits / 50)."""

    def __init__(self, input_dim: int, hidden_dim: int, num_heads: int, use_per_dim_scale: bool) -> None:
        super().__init__()
        if hidden_dim % num_heads:
            raise ValueError(f"attention width {hidden_dim} is not a multiple of {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = hidden_dim // num_heads
        self.query = _linear(input_dim, hidden_dim)
        self.key = _linear(input_dim, hidden_dim)
        self.value = _linear(input_dim, hidden_dim)
        # the released output projection w[D, heads, head_dim] takes its fan-in from head_dim
        # alone (layers.py line 169), not from heads * head_dim
        self.post = _linear(hidden_dim, input_dim, fan_in=self.head_dim)
        self.per_dim_scale = PerDimScale(self.head_dim) if use_per_dim_scale else None

    def forward(self, queries: torch.Tensor, keys_values: torch.Tensor) -> torch.Tensor:
        batch, q_len, _ = queries.shape
        kv_len = keys_values.shape[1]
        q = self.query(queries).view(batch, q_len, self.num_heads, self.head_dim)
        k = self.key(keys_values).view(batch, kv_len, self.num_heads, self.head_dim)
        v = self.value(keys_values).view(batch, kv_len, self.num_heads, self.head_dim)
        q = self.per_dim_scale(q) if self.per_dim_scale is not None else q * self.head_dim**-0.5
        logits = torch.einsum("btnh,bsnh->bnts", q, k)
        logits = LOGIT_CAP * torch.tanh(logits / LOGIT_CAP)
        probs = logits.softmax(dim=-1).to(v.dtype)
        encoded = torch.einsum("bnts,bsnh->btnh", probs, v).reshape(batch, q_len, -1)
        return self.post(encoded)


class FeedForward(nn.Module):
    """x + Linear(4D -> D)(ReLU(Linear(D -> 4D)(LayerNorm(x))))."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.layer_norm = LayerNorm(dim)
        self.ffn_layer1 = _linear(dim, hidden_dim)
        self.ffn_layer2 = _linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn_layer2(F.relu(self.ffn_layer1(self.layer_norm(x))))


class FusionLayer(nn.Module):
    """A pre-LayerNorm transformer layer: attention with a residual, then the feed-forward block."""

    def __init__(self, head: HeadConfig) -> None:
        super().__init__()
        self.layer_norm = LayerNorm(head.embed_dim)
        self.self_attention = DotProductAttention(
            head.embed_dim, head.embed_dim, head.num_heads, use_per_dim_scale=False
        )
        self.ff_layer = FeedForward(head.embed_dim, head.ffn_hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = self.layer_norm(x)
        return self.ff_layer(x + self.self_attention(normed, normed))


class FusionEncoder(nn.Module):
    def __init__(self, head: HeadConfig) -> None:
        super().__init__()
        self.x_layers = nn.ModuleList(FusionLayer(head) for _ in range(head.num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.x_layers:
            x = layer(x)
        return x


class AttentionPooler(nn.Module):
    """Learned query tokens attend over the sequence (width 4D, per-dim query scale), then LayerNorm.

    There is no residual: the output is the LayerNorm of the attention output.
    """

    def __init__(self, head: HeadConfig) -> None:
        super().__init__()
        # lecun_normal over (num_query_tokens, D) takes its fan-in from num_query_tokens (layers.py
        # line 421): a standard deviation of 1 for the released single query token
        self.pooling_attn_query = nn.Parameter(
            _lecun_normal_(torch.empty(head.num_query_tokens, head.embed_dim), fan_in=head.num_query_tokens)
        )
        self.pool_attn = DotProductAttention(
            head.embed_dim, head.pooler_hidden_dim, head.num_heads, use_per_dim_scale=True
        )
        self.pool_attn_ln = LayerNorm(head.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        queries = self.pooling_attn_query.unsqueeze(0).expand(x.shape[0], -1, -1).to(x.dtype)
        return self.pool_attn_ln(self.pool_attn(queries, x))


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """In float32 whatever the input precision, as the released code does."""
    x = x.float()
    return x / torch.sqrt((x * x).sum(dim=-1, keepdim=True) + 1e-12)


class MagicLens(nn.Module):
    """A (image, instruction) pair -> one L2-normalised float32 embedding.

    Gallery images and training targets are embedded with the empty instruction "".
    `clip.logit_scale` is the training loss's inverse temperature (log-parametrised, as in CLIP).
    """

    def __init__(self, config: ModelConfig, tokenizer: PreTrainedTokenizerBase, clip: CLIPModel | None = None) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.clip = clip if clip is not None else CLIPModel(config.clip_config())
        self.multimodal_encoder = FusionEncoder(config.head)
        self.contrastive_multimodal_pooler = AttentionPooler(config.head)
        self.register_buffer("empty_instruction_ids", tokenize(tokenizer, [""]), persistent=False)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised pixels -> (B, D) projected CLIP image embeddings."""
        return self.clip.get_image_features(pixel_values=pixel_values).pooler_output

    def encode_texts(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, D) projected CLIP text embeddings.

        Every position whose id is 0 is masked out of the attention, as the released text encoder
        masks it (Scenic CLIP TextEncoder: attention mask `text > 0` combined with the causal
        mask): that is the padding, but also the BPE symbol "!" where it does not merge with
        the symbol after it ("a dog!;").
        """
        return self.clip.get_text_features(input_ids=input_ids, attention_mask=input_ids > 0).pooler_output

    def fuse(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        sequence = torch.stack([image_embeds, text_embeds], dim=1)  # (B, 2, D)
        pooled = self.contrastive_multimodal_pooler(self.multimodal_encoder(sequence))
        return l2_normalize(pooled[:, 0])

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.encode_images(pixel_values), self.encode_texts(input_ids))

    def forward_triplets(
        self, query_pixels: torch.Tensor, input_ids: torch.Tensor, target_pixels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The three embeddings the loss needs, with each CLIP tower run once:
        (query image + instruction), (target image + ""), (query image + "")."""
        batch = query_pixels.shape[0]
        images = self.encode_images(torch.cat([query_pixels, target_pixels]))
        empty_ids = self.empty_instruction_ids[:, : input_ids.shape[1]]  # start, end, padding
        texts = self.encode_texts(torch.cat([input_ids, empty_ids]))
        query_images, target_images = images[:batch], images[batch:]
        instructions, empty = texts[:batch], texts[batch:].expand(batch, -1)
        fused = self.fuse(
            torch.cat([query_images, target_images, query_images]),
            torch.cat([instructions, empty, empty]),
        )
        queries, targets, query_images_alone = fused.split(batch)
        return queries, targets, query_images_alone

    @torch.no_grad()
    def embed(self, pixel_values: torch.Tensor, instructions: list[str]) -> torch.Tensor:
        """Embeddings (B, D) float32, L2-normalised, of preprocessed images (see
        model.preprocess.to_model_input) each with its instruction ("" for a gallery image)."""
        if pixel_values.shape[0] != len(instructions):
            raise ValueError(f"{pixel_values.shape[0]} images but {len(instructions)} instructions")
        device = self.empty_instruction_ids.device
        input_ids = tokenize(self.tokenizer, instructions, fixed_length=False).to(device)
        return self(pixel_values.to(device), input_ids)
