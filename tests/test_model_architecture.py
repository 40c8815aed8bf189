"""The MagicLens head is the released architecture: sizes, names and the exact forward computation.

The reference below re-implements the released Flax layers (layers.py / model.py of
google-deepmind/magiclens) with einsums on Flax-shaped weights, taken from our parameters through
the name mapping documented in model/magiclens.py; our modules must compute the same numbers.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from magiclens.model.config import HEADS, model_config
from magiclens.model.magiclens import AttentionPooler, FusionEncoder, LayerNorm, MagicLens, PerDimScale
from magiclens.model.tokenizer import bundled_clip_tokenizer, tokenize

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return bundled_clip_tokenizer()


def _count(model: MagicLens) -> tuple[int, int]:
    head = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("clip."))
    return head, sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("name", "head_params", "total_millions"), [("base", 16_812_288, 166.4), ("large", 37_801_152, 465.4)]
)
def test_parameter_counts_match_the_released_models(tokenizer, name, head_params, total_millions) -> None:
    with torch.device("meta"):  # shapes only: no memory, no initialisation time
        model = MagicLens(model_config(name), tokenizer)
    head, total = _count(model)
    assert head == head_params
    assert round(total / 1e6, 1) == total_millions


def test_backbones_are_openai_clip_with_quickgelu() -> None:
    base = model_config("base").clip_config()
    large = model_config("large").clip_config()
    assert (base.vision_config.patch_size, base.vision_config.hidden_size, base.projection_dim) == (16, 768, 512)
    assert (large.vision_config.patch_size, large.vision_config.hidden_size, large.projection_dim) == (14, 1024, 768)
    for config in (base, large):
        assert config.vision_config.image_size == 224
        assert config.text_config.max_position_embeddings == 77
        assert config.text_config.hidden_act == config.vision_config.hidden_act == "quick_gelu"


def test_a_backbone_of_the_wrong_width_is_refused() -> None:
    with pytest.raises(ValueError, match="512-d"):
        model_config("base", model_config("large").clip_config())


def _expected_head_names(num_layers: int) -> set[str]:
    names = {"contrastive_multimodal_pooler.pooling_attn_query"}
    for proj in ("query", "key", "value", "post"):
        names |= {f"contrastive_multimodal_pooler.pool_attn.{proj}.{p}" for p in ("weight", "bias")}
    names |= {"contrastive_multimodal_pooler.pool_attn.per_dim_scale.per_dim_scale"}
    names |= {f"contrastive_multimodal_pooler.pool_attn_ln.{p}" for p in ("scale", "bias")}
    for i in range(num_layers):
        layer = f"multimodal_encoder.x_layers.{i}"
        names |= {f"{layer}.layer_norm.{p}" for p in ("scale", "bias")}
        names |= {f"{layer}.ff_layer.layer_norm.{p}" for p in ("scale", "bias")}
        for proj in ("query", "key", "value", "post"):
            names |= {f"{layer}.self_attention.{proj}.{p}" for p in ("weight", "bias")}
        for ffn in ("ffn_layer1", "ffn_layer2"):
            names |= {f"{layer}.ff_layer.{ffn}.{p}" for p in ("weight", "bias")}
    return names


def test_head_parameter_names_follow_the_flax_tree(tokenizer) -> None:
    with torch.device("meta"):
        model = MagicLens(model_config("base"), tokenizer)
    head_names = {n for n, _ in model.named_parameters() if not n.startswith("clip.")}
    assert head_names == _expected_head_names(4)
    shapes = dict(model.named_parameters())
    # pooler attention is 4D wide with 8 heads: per-dim scale over a 256-d head
    assert shapes["contrastive_multimodal_pooler.pool_attn.query.weight"].shape == (2048, 512)
    assert shapes["contrastive_multimodal_pooler.pool_attn.per_dim_scale.per_dim_scale"].shape == (256,)
    assert shapes["multimodal_encoder.x_layers.0.ff_layer.ffn_layer1.weight"].shape == (2048, 512)
    assert shapes["multimodal_encoder.x_layers.0.self_attention.query.weight"].shape == (512, 512)


# ---- a reference implementation of the released Flax head, on Flax-shaped weights ----


def _ref_layer_norm(x, scale, bias):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) * torch.rsqrt(var + 1e-6) * (1 + scale) + bias


def _ref_attention(q_in, kv_in, p, prefix, num_heads, per_dim_scale, cap=True):
    d = q_in.shape[-1]
    flax = {}
    for proj in ("query", "key", "value"):
        flax[proj] = (
            p[f"{prefix}.{proj}.weight"].T.reshape(d, num_heads, -1),
            p[f"{prefix}.{proj}.bias"].reshape(num_heads, -1),
        )
    q = torch.einsum("btd,dnh->btnh", q_in, flax["query"][0]) + flax["query"][1]
    k = torch.einsum("bsd,dnh->bsnh", kv_in, flax["key"][0]) + flax["key"][1]
    v = torch.einsum("bsd,dnh->bsnh", kv_in, flax["value"][0]) + flax["value"][1]
    head_dim = q.shape[-1]
    if per_dim_scale:
        q = q * (1.442695041 / math.sqrt(head_dim) * F.softplus(p[f"{prefix}.per_dim_scale.per_dim_scale"]))
    else:
        q = q * head_dim**-0.5
    logits = torch.einsum("btnh,bsnh->bnts", q, k)
    if cap:
        logits = 50.0 * torch.tanh(logits / 50.0)
    encoded = torch.einsum("bnts,bsnh->btnh", logits.softmax(-1), v)
    post_w = p[f"{prefix}.post.weight"].reshape(d, num_heads, head_dim)  # Flax w[D, N, H]
    return torch.einsum("btnh,dnh->btd", encoded, post_w) + p[f"{prefix}.post.bias"]


def _ref_head(p, image_embeds, text_embeds, num_layers, num_heads, cap=True):
    x = torch.stack([image_embeds, text_embeds], dim=1)
    for i in range(num_layers):
        prefix = f"multimodal_encoder.x_layers.{i}"
        normed = _ref_layer_norm(x, p[f"{prefix}.layer_norm.scale"], p[f"{prefix}.layer_norm.bias"])
        x = x + _ref_attention(normed, normed, p, f"{prefix}.self_attention", num_heads, False, cap)
        h = _ref_layer_norm(x, p[f"{prefix}.ff_layer.layer_norm.scale"], p[f"{prefix}.ff_layer.layer_norm.bias"])
        h = F.relu(h @ p[f"{prefix}.ff_layer.ffn_layer1.weight"].T + p[f"{prefix}.ff_layer.ffn_layer1.bias"])
        x = x + h @ p[f"{prefix}.ff_layer.ffn_layer2.weight"].T + p[f"{prefix}.ff_layer.ffn_layer2.bias"]
    pool = "contrastive_multimodal_pooler"
    query = p[f"{pool}.pooling_attn_query"].unsqueeze(0).expand(x.shape[0], -1, -1)
    pooled = _ref_attention(query, x, p, f"{pool}.pool_attn", num_heads, True, cap)  # no residual
    pooled = _ref_layer_norm(pooled, p[f"{pool}.pool_attn_ln.scale"], p[f"{pool}.pool_attn_ln.bias"])[:, 0]
    return pooled / torch.sqrt((pooled * pooled).sum(-1, keepdim=True) + 1e-12)


@pytest.fixture(scope="module")
def tiny_model(tokenizer) -> MagicLens:
    torch.manual_seed(0)
    model = MagicLens(model_config("tiny"), tokenizer).eval()
    with torch.no_grad():  # move every offset-style parameter away from its initial value
        for name, param in model.named_parameters():
            if not name.startswith("clip.") and param.ndim == 1:
                param.normal_(0, 0.5)
    return model


def test_head_computes_what_the_released_code_computes(tiny_model) -> None:
    torch.manual_seed(1)
    image, text = torch.randn(5, 64), torch.randn(5, 64)
    params = dict(tiny_model.named_parameters())
    head = HEADS["tiny"]
    with torch.no_grad():
        ours = tiny_model.fuse(image, text)
        reference = _ref_head(params, image, text, head.num_layers, head.num_heads)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.norm(dim=-1), torch.ones(5))


def test_attention_logits_are_soft_capped_at_50(tiny_model) -> None:
    # inputs large enough for attention logits far beyond 50, where the cap changes the result
    torch.manual_seed(2)
    image, text = 200 * torch.randn(3, 64), 200 * torch.randn(3, 64)
    params = dict(tiny_model.named_parameters())
    head = HEADS["tiny"]
    attention = tiny_model.multimodal_encoder.x_layers[0].self_attention
    with torch.no_grad():
        x = torch.stack([image, text], dim=1)
        q = attention.query(x).view(3, 2, head.num_heads, -1) * attention.head_dim**-0.5
        k = attention.key(x).view(3, 2, head.num_heads, -1)
        assert torch.einsum("btnh,bsnh->bnts", q, k).abs().max() > 100
        ours = tiny_model.fuse(image, text)
        capped = _ref_head(params, image, text, head.num_layers, head.num_heads, cap=True)
        uncapped = _ref_head(params, image, text, head.num_layers, head.num_heads, cap=False)
    torch.testing.assert_close(ours, capped, atol=1e-4, rtol=1e-4)
    assert (ours - uncapped).abs().max() > 1e-2


def test_layer_norm_weight_is_an_offset_from_one() -> None:
    norm = LayerNorm(4)
    assert set(dict(norm.named_parameters())) == {"scale", "bias"}
    with torch.no_grad():
        norm.scale.copy_(torch.tensor([0.0, 1.0, -0.5, 2.0]))
        norm.bias.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    x = torch.tensor([[1.0, 2.0, 3.0, 6.0]])
    normed = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-6)
    expected = normed * torch.tensor([1.0, 2.0, 0.5, 3.0]) + torch.tensor([0.1, 0.2, 0.3, 0.4])
    torch.testing.assert_close(norm(x), expected)


def test_per_dim_scale_scales_queries_by_softplus() -> None:
    scale = PerDimScale(16)
    x = torch.ones(1, 16)
    with torch.no_grad():
        scale.per_dim_scale.zero_()
    # at zero the scale is the usual 1/sqrt(head_dim)
    torch.testing.assert_close(scale(x), torch.full((1, 16), 16**-0.5))
    with torch.no_grad():
        scale.per_dim_scale.copy_(torch.linspace(-2, 2, 16))
    expected = 1.442695041 / 4.0 * F.softplus(torch.linspace(-2, 2, 16))
    torch.testing.assert_close(scale(x)[0], expected)


def test_triplet_forward_matches_separate_embeddings(tiny_model) -> None:
    torch.manual_seed(3)
    queries, targets = torch.randn(3, 3, 64, 64), torch.randn(3, 3, 64, 64)
    instructions = ["a red one", "the same but at night", "x"]
    ids = tokenize(tiny_model.tokenizer, instructions, fixed_length=False)
    with torch.no_grad():
        q, t, alone = tiny_model.forward_triplets(queries, ids, targets)
        torch.testing.assert_close(q, tiny_model.embed(queries, instructions), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(t, tiny_model.embed(targets, [""] * 3), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(alone, tiny_model.embed(queries, [""] * 3), atol=1e-5, rtol=1e-5)


def test_short_token_ids_give_the_same_embeddings_as_77(tiny_model) -> None:
    """Causal text attention pooled at the end token: trailing padding changes nothing."""
    images = torch.randn(2, 3, 64, 64)
    texts = ["the same building at night", "a charger for this phone"]
    with torch.no_grad():
        full = tiny_model(images, tokenize(tiny_model.tokenizer, texts, fixed_length=True))
        short = tiny_model(images, tokenize(tiny_model.tokenizer, texts, fixed_length=False))
    torch.testing.assert_close(full, short, atol=1e-5, rtol=1e-5)


def test_embeddings_are_float32_and_normalised_under_bf16_autocast(tiny_model) -> None:
    images = torch.randn(2, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny_model.embed(images, ["one", "two"])
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2))


# ---- initial values: google-deepmind/magiclens layers.py (commit 5135f58be020) ----


def test_layer_norm_scales_and_per_dim_scale_start_at_one_as_released() -> None:
    torch.manual_seed(4)
    model = MagicLens(model_config("tiny"), bundled_clip_tokenizer())
    head = {n: p for n, p in model.named_parameters() if not n.startswith("clip.")}
    scales = [n for n in head if n.endswith(("layer_norm.scale", "pool_attn_ln.scale"))]
    # 4 fusion layers x (attention and feed-forward LayerNorm) + the pooler's LayerNorm
    assert len(scales) == 2 * HEADS["tiny"].num_layers + 1
    for name in scales + ["contrastive_multimodal_pooler.pool_attn.per_dim_scale.per_dim_scale"]:
        torch.testing.assert_close(head[name], torch.ones_like(head[name]), msg=name)
    # so a fresh LayerNorm multiplies by 2, and the pooler's query scale is softplus(1) / softplus(0)
    # = 1.8946 times 1 / sqrt(head_dim)
    norm = LayerNorm(4)
    x = torch.tensor([[1.0, 2.0, 3.0, 6.0]])
    torch.testing.assert_close(norm(x), 2 * (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-6))
    pooler_scale = PerDimScale(16)(torch.ones(16))
    torch.testing.assert_close(pooler_scale, torch.full((16,), 1.442695041 * math.log1p(math.e) / 4))


def test_initial_weights_have_the_released_lecun_normal_spread() -> None:
    """Truncated at two deviations, variance 1 / fan_in, with the released fan-ins: the input width
    for query/key/value and the feed-forward layers, head_dim for the attention output projection
    (w[D, heads, head_dim] with fan-in axis -1), num_query_tokens (1) for the pooler's query."""
    torch.manual_seed(5)
    head = HEADS["base"]  # the head alone: the CLIP towers come from CLIP's own initialisation
    modules = nn.ModuleDict({"multimodal_encoder": FusionEncoder(head), "contrastive_multimodal_pooler": AttentionPooler(head)})
    params = dict(modules.named_parameters())
    pool, layer = "contrastive_multimodal_pooler", "multimodal_encoder.x_layers.0"
    expected = {
        f"{layer}.self_attention.query.weight": 512**-0.5,
        f"{layer}.self_attention.post.weight": 64**-0.5,  # 8 heads of 64
        f"{layer}.ff_layer.ffn_layer2.weight": 2048**-0.5,
        f"{pool}.pool_attn.post.weight": 256**-0.5,  # 8 heads of 256
        f"{pool}.pool_attn.key.weight": 512**-0.5,
    }
    for name, std in expected.items():
        weight = params[name].detach()
        assert abs(weight.std().item() / std - 1) < 0.02, name
        # truncated at two deviations of the widened normal (std / 0.8796)
        assert weight.abs().max().item() <= 2 * std / 0.87962566103423978 + 1e-6, name
        assert weight.abs().max().item() > 2 * std, name
        torch.testing.assert_close(params[name.replace("weight", "bias")], torch.zeros_like(params[name.replace("weight", "bias")]))
    query = params[f"{pool}.pooling_attn_query"].detach()
    assert query.shape == (1, 512)
    assert 0.9 < query.std().item() < 1.1
