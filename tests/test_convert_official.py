"""The converter of the released MagicLens weights.

A random parameter tree is built here with the official names and shapes (written down from the
released Flax code: google-deepmind/magiclens model.py and layers.py, and Scenic's CLIP layers),
serialised the way flax.serialization.to_bytes does and pickled as the released files are. After
conversion, the torch model's embeddings must match a NumPy implementation of the official forward
pass (also written here) to 1e-4.
"""

from __future__ import annotations

import argparse
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
from transformers import CLIPConfig

from magiclens.model import convert_official
from magiclens.model.checkpoint import load_checkpoint
from magiclens.model.config import model_config
from magiclens.model.convert_official import ConversionError, conversion_rules, load_official_params, read_official_params
from magiclens.model.magiclens import MagicLens
from magiclens.model.preprocess import PreprocessConfig, images_to_model_input
from magiclens.model.tokenizer import bundled_clip_tokenizer, tokenize

# the last one holds the BPE symbol "!" (id 0), which the released text encoder masks
INSTRUCTIONS = ["", "find a red mug but on a wooden table", "the inside of this building!; at night"]
PHOTOS = ["skimage/coffee.png", "skimage/astronaut.png", "matplotlib/grace_hopper.jpg"]


@dataclass(frozen=True)
class Dims:
    vision_width: int
    vision_layers: int
    vision_heads: int
    patch: int
    image_size: int
    text_width: int
    text_layers: int
    text_heads: int
    embed_dim: int  # CLIP projection = width of the MagicLens head
    head_heads: int
    vocab: int = 49408
    context: int = 77
    head_layers: int = 4


# The released models (Scenic CLIP vit_b16 / vit_l14: vision heads = width / 64).
RELEASED = {
    "base": Dims(768, 12, 12, 16, 224, 512, 12, 8, embed_dim=512, head_heads=8),
    "large": Dims(1024, 24, 16, 14, 224, 768, 12, 12, embed_dim=768, head_heads=16),
}
# Small CLIP towers under the full-size base and large heads.
SMALL_CLIP_BASE_HEAD = Dims(32, 2, 2, 8, 32, 32, 2, 2, embed_dim=512, head_heads=8)
SMALL_CLIP_LARGE_HEAD = Dims(32, 1, 2, 8, 32, 32, 1, 2, embed_dim=768, head_heads=16)


def official_shapes(d: Dims) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"clip/logit_scale": ()}

    def layer_norm(prefix: str, width: int) -> None:
        shapes[f"{prefix}/scale"] = (width,)
        shapes[f"{prefix}/bias"] = (width,)

    def resblock(prefix: str, width: int, heads: int) -> None:
        layer_norm(f"{prefix}/ln_1", width)
        layer_norm(f"{prefix}/ln_2", width)
        for projection in ("query", "key", "value"):
            shapes[f"{prefix}/attn/{projection}/kernel"] = (width, heads, width // heads)
            shapes[f"{prefix}/attn/{projection}/bias"] = (heads, width // heads)
        shapes[f"{prefix}/attn/out/kernel"] = (heads, width // heads, width)
        shapes[f"{prefix}/attn/out/bias"] = (width,)
        shapes[f"{prefix}/mlp/c_fc/kernel"] = (width, 4 * width)
        shapes[f"{prefix}/mlp/c_fc/bias"] = (4 * width,)
        shapes[f"{prefix}/mlp/c_proj/kernel"] = (4 * width, width)
        shapes[f"{prefix}/mlp/c_proj/bias"] = (width,)

    w = d.vision_width
    shapes["clip/visual/conv1/kernel"] = (d.patch, d.patch, 3, w)
    shapes["clip/visual/class_embedding"] = (w,)
    shapes["clip/visual/positional_embedding"] = ((d.image_size // d.patch) ** 2 + 1, w)
    layer_norm("clip/visual/ln_pre", w)
    layer_norm("clip/visual/ln_post", w)
    shapes["clip/visual/proj/kernel"] = (w, d.embed_dim)
    for i in range(d.vision_layers):
        resblock(f"clip/visual/transformer/resblocks_{i}", w, d.vision_heads)
    t = d.text_width
    shapes["clip/text/token_embedding/embedding"] = (d.vocab, t)
    shapes["clip/text/positional_embedding"] = (d.context, t)
    layer_norm("clip/text/ln_final", t)
    shapes["clip/text/text_projection/kernel"] = (t, d.embed_dim)
    for i in range(d.text_layers):
        resblock(f"clip/text/transformer/resblocks_{i}", t, d.text_heads)

    dim, heads = d.embed_dim, d.head_heads

    def attention(prefix: str, hidden: int) -> None:
        for projection in ("query", "key", "value"):
            shapes[f"{prefix}/{projection}/w"] = (dim, heads, hidden // heads)
            shapes[f"{prefix}/{projection}/b"] = (heads, hidden // heads)
        shapes[f"{prefix}/post/w"] = (dim, heads, hidden // heads)
        shapes[f"{prefix}/post/b"] = (dim,)

    for i in range(d.head_layers):
        prefix = f"multimodal_encoder/x_layers_{i}"
        layer_norm(f"{prefix}/layer_norm", dim)
        attention(f"{prefix}/self_attention", dim)
        layer_norm(f"{prefix}/ff_layer/layer_norm", dim)
        shapes[f"{prefix}/ff_layer/ffn_layer1/linear/w"] = (dim, 4 * dim)
        shapes[f"{prefix}/ff_layer/ffn_layer1/bias/b"] = (4 * dim,)
        shapes[f"{prefix}/ff_layer/ffn_layer2/linear/w"] = (4 * dim, dim)
        shapes[f"{prefix}/ff_layer/ffn_layer2/bias/b"] = (dim,)
    pooler = "contrastive_multimodal_pooler"
    shapes[f"{pooler}/pooling_attn_query"] = (1, dim)
    attention(f"{pooler}/pool_attn", 4 * dim)
    shapes[f"{pooler}/pool_attn/per_dim_scale/per_dim_scale"] = (4 * dim // heads,)
    layer_norm(f"{pooler}/pool_attn_ln", dim)
    return shapes


def random_params(d: Dims, seed: int = 0) -> dict[str, np.ndarray]:
    """Values away from any initialisation, with sizes that keep activations of order 1."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in official_shapes(d).items():
        noise = rng.standard_normal(shape)
        if name == "clip/logit_scale":
            value = np.asarray(4.6)
        elif name.startswith("clip/") and name.endswith("/scale"):  # plain LayerNorm weight
            value = 1 + 0.1 * noise
        elif name.endswith("/scale"):  # MagicLens LayerNorm: an offset from 1
            value = 0.2 * noise
        elif name.endswith("per_dim_scale"):
            value = 0.5 * noise
        elif name.endswith(("/bias", "/b")):
            value = 0.05 * noise
        elif name.endswith("/out/kernel"):
            value = noise / np.sqrt(shape[0] * shape[1])
        elif name.endswith("conv1/kernel"):
            value = noise / np.sqrt(shape[0] * shape[1] * shape[2])
        elif name.endswith(("kernel", "/w", "pooling_attn_query")):
            value = noise / np.sqrt(shape[0])
        else:  # embeddings
            value = 0.1 * noise
        params[name] = value.astype(np.float32)
    return params


def nest(flat: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = tree
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return tree


def flax_to_bytes(tree: dict) -> bytes:
    """What flax.serialization.to_bytes writes: msgpack, arrays as extension type 1, scalars as 3."""

    def array_bytes(array: np.ndarray) -> bytes:
        return msgpack.packb((array.shape, array.dtype.name, array.tobytes("C")), use_bin_type=True)

    def default(value: object) -> object:
        if isinstance(value, np.ndarray):
            return msgpack.ExtType(1, array_bytes(value))
        if isinstance(value, np.generic):
            return msgpack.ExtType(3, array_bytes(np.asarray(value)))
        raise TypeError(type(value))

    return msgpack.packb(tree, default=default, strict_types=True)


def write_released_file(path: Path, flat: dict[str, np.ndarray], protocol: int = 4) -> None:
    """A file like magic_lens_clip_base.pkl: the pickled bytes of the serialised variables."""
    tree = nest({name: (value[()] if value.shape == () else value) for name, value in flat.items()})
    path.write_bytes(pickle.dumps(flax_to_bytes({"params": tree}), protocol=protocol))


def clip_config(d: Dims) -> CLIPConfig:
    text = dict(
        vocab_size=d.vocab,
        hidden_size=d.text_width,
        intermediate_size=4 * d.text_width,
        num_hidden_layers=d.text_layers,
        num_attention_heads=d.text_heads,
        max_position_embeddings=d.context,
        hidden_act="quick_gelu",
        projection_dim=d.embed_dim,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    vision = dict(
        hidden_size=d.vision_width,
        intermediate_size=4 * d.vision_width,
        num_hidden_layers=d.vision_layers,
        num_attention_heads=d.vision_heads,
        image_size=d.image_size,
        patch_size=d.patch,
        hidden_act="quick_gelu",
        projection_dim=d.embed_dim,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=d.embed_dim)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- the official forward pass, in NumPy (float64) -----------------------------------------------


def layer_norm(x: np.ndarray, scale: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def scenic_attention(x: np.ndarray, p: dict, mask: np.ndarray | None) -> np.ndarray:
    """flax MultiHeadDotProductAttention: DenseGeneral projections, query / sqrt(head_dim)."""
    q = np.einsum("btd,dnh->btnh", x, p["query"]["kernel"]) + p["query"]["bias"]
    k = np.einsum("btd,dnh->btnh", x, p["key"]["kernel"]) + p["key"]["bias"]
    v = np.einsum("btd,dnh->btnh", x, p["value"]["kernel"]) + p["value"]["bias"]
    logits = np.einsum("bqnh,bknh->bnqk", q / np.sqrt(q.shape[-1]), k)
    if mask is not None:
        logits = np.where(mask, logits, np.finfo(np.float64).min)
    out = np.einsum("bnqk,bknh->bqnh", softmax(logits), v)
    return np.einsum("bqnh,nhd->bqd", out, p["out"]["kernel"]) + p["out"]["bias"]


def scenic_resblock(x: np.ndarray, p: dict, mask: np.ndarray | None) -> np.ndarray:
    x = x + scenic_attention(layer_norm(x, p["ln_1"]["scale"], p["ln_1"]["bias"], 1e-5), p["attn"], mask)
    h = layer_norm(x, p["ln_2"]["scale"], p["ln_2"]["bias"], 1e-5)
    h = h @ p["mlp"]["c_fc"]["kernel"] + p["mlp"]["c_fc"]["bias"]
    h = h / (1 + np.exp(-1.702 * h))  # quick_gelu
    return x + h @ p["mlp"]["c_proj"]["kernel"] + p["mlp"]["c_proj"]["bias"]


def scenic_image(images: np.ndarray, p: dict) -> np.ndarray:
    """images (B, H, W, 3), already normalised -> (B, E)."""
    kernel = p["conv1"]["kernel"]
    patch = kernel.shape[0]
    b, h, w, c = images.shape
    patches = images.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    x = np.einsum("bijpqc,pqcw->bijw", patches, kernel).reshape(b, -1, kernel.shape[-1])
    x = np.concatenate([np.broadcast_to(p["class_embedding"], (b, 1, x.shape[-1])), x], axis=1)
    x = layer_norm(x + p["positional_embedding"], p["ln_pre"]["scale"], p["ln_pre"]["bias"], 1e-5)
    for i in range(len(p["transformer"])):
        x = scenic_resblock(x, p["transformer"][f"resblocks_{i}"], None)
    return layer_norm(x[:, 0], p["ln_post"]["scale"], p["ln_post"]["bias"], 1e-5) @ p["proj"]["kernel"]


def scenic_text(ids: np.ndarray, p: dict) -> np.ndarray:
    """ids (B, 77), padded with 0 as Scenic's tokenizer pads -> (B, E)."""
    valid = ids > 0
    causal = np.tril(np.ones((ids.shape[1], ids.shape[1]), bool))
    mask = (valid[:, None, :, None] & valid[:, None, None, :]) & causal
    x = p["token_embedding"]["embedding"][ids] + p["positional_embedding"]
    for i in range(len(p["transformer"])):
        x = scenic_resblock(x, p["transformer"][f"resblocks_{i}"], mask)
    x = layer_norm(x, p["ln_final"]["scale"], p["ln_final"]["bias"], 1e-5)
    return x[np.arange(ids.shape[0]), ids.argmax(-1)] @ p["text_projection"]["kernel"]


def magiclens_norm(x: np.ndarray, p: dict) -> np.ndarray:
    return layer_norm(x, 1 + p["scale"], p["bias"], 1e-6)


def magiclens_attention(queries: np.ndarray, keys_values: np.ndarray, p: dict) -> np.ndarray:
    q = np.einsum("btd,dnh->btnh", queries, p["query"]["w"]) + p["query"]["b"]
    k = np.einsum("btd,dnh->btnh", keys_values, p["key"]["w"]) + p["key"]["b"]
    v = np.einsum("btd,dnh->btnh", keys_values, p["value"]["w"]) + p["value"]["b"]
    head_dim = q.shape[-1]
    if "per_dim_scale" in p:
        softplus = np.log1p(np.exp(p["per_dim_scale"]["per_dim_scale"]))
        q = q * (1.442695041 / np.sqrt(head_dim) * softplus)
    else:
        q = q * head_dim**-0.5
    logits = np.einsum("btnh,bsnh->bnts", q, k)
    logits = 50.0 * np.tanh(logits / 50.0)
    encoded = np.einsum("bnts,bsnh->btnh", softmax(logits), v)
    return np.einsum("btnh,dnh->btd", encoded, p["post"]["w"]) + p["post"]["b"]


def official_embeddings(params: dict[str, np.ndarray], images: np.ndarray, ids: np.ndarray) -> np.ndarray:
    p = nest({name: value.astype(np.float64) for name, value in params.items()})
    x = np.stack([scenic_image(images, p["clip"]["visual"]), scenic_text(ids, p["clip"]["text"])], axis=1)
    encoder = p["multimodal_encoder"]
    for i in range(len(encoder)):
        layer = encoder[f"x_layers_{i}"]
        normed = magiclens_norm(x, layer["layer_norm"])
        x = x + magiclens_attention(normed, normed, layer["self_attention"])
        ff = layer["ff_layer"]
        h = magiclens_norm(x, ff["layer_norm"])
        h = np.maximum(h @ ff["ffn_layer1"]["linear"]["w"] + ff["ffn_layer1"]["bias"]["b"], 0)
        x = x + h @ ff["ffn_layer2"]["linear"]["w"] + ff["ffn_layer2"]["bias"]["b"]
    pooler = p["contrastive_multimodal_pooler"]
    query = np.broadcast_to(pooler["pooling_attn_query"], (x.shape[0],) + pooler["pooling_attn_query"].shape)
    pooled = magiclens_norm(magiclens_attention(query, x, pooler["pool_attn"]), pooler["pool_attn_ln"])[:, 0]
    return pooled / np.sqrt((pooled * pooled).sum(-1, keepdims=True) + 1e-12)


# --- helpers -------------------------------------------------------------------------------------


def model_inputs(shared_data: Path, image_size: int) -> tuple[torch.Tensor, np.ndarray]:
    """Pixels from the released preprocessing, for torch (NCHW) and for the reference (NHWC)."""
    images = [(shared_data / "images" / "photos" / name).read_bytes() for name in PHOTOS]
    pixels = images_to_model_input(images, PreprocessConfig(image_size=image_size), exif_transpose=False, float_resize=True)
    return pixels, pixels.permute(0, 2, 3, 1).numpy().astype(np.float64)


def scenic_ids(texts: list[str]) -> np.ndarray:
    """Token ids as Scenic's tokenizer gives them (tests/test_model_fidelity.py checks that ours are)."""
    ids = tokenize(bundled_clip_tokenizer(), texts).numpy()
    assert ids.shape[1] == 77 and 0 in ids[-1, 1 : int(np.argmax(ids[-1] == 49407))]
    return ids


def converted_model(d: Dims, head: str, params: dict[str, np.ndarray]) -> MagicLens:
    model = MagicLens(model_config(head, clip_config(d)), bundled_clip_tokenizer())
    load_official_params(model, params)
    return model.eval()


def assert_matches_official(model: MagicLens, params: dict[str, np.ndarray], shared_data: Path, image_size: int) -> None:
    pixels, images = model_inputs(shared_data, image_size)
    got = model.embed(pixels, INSTRUCTIONS).numpy()
    expected = official_embeddings(params, images, scenic_ids(INSTRUCTIONS))
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < 1e-4
    # the three inputs are told apart: the check is not passing on a constant
    assert np.abs(expected[0] - expected[1]).max() > 1e-2


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    convert_official.add_arguments(parser)
    return convert_official.run(parser.parse_args(argv), [])


# --- tests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("head, dims", [("base", SMALL_CLIP_BASE_HEAD), ("large", SMALL_CLIP_LARGE_HEAD)])
def test_converted_model_matches_the_official_forward_pass(head: str, dims: Dims, shared_data: Path) -> None:
    params = random_params(dims, seed=len(head))
    model = converted_model(dims, head, params)
    assert_matches_official(model, params, shared_data, dims.image_size)


@pytest.mark.parametrize("size", ["base", "large"])
def test_full_size_names_and_shapes(size: str) -> None:
    config = model_config(size)
    rules = conversion_rules(config)
    expected = official_shapes(RELEASED[size])
    assert {rule.official_name: rule.official_shape for rule in rules} == expected
    head_parameters = sum(int(np.prod(shape)) for name, shape in expected.items() if not name.startswith("clip/"))
    assert head_parameters == {"base": 16_812_288, "large": 37_801_152}[size]
    with torch.device("meta"):
        model = MagicLens(config, bundled_clip_tokenizer())
    torch_shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert set(torch_shapes) == {rule.torch_name for rule in rules}
    for rule in rules:
        converted = rule.transform(np.broadcast_to(np.float32(0), rule.official_shape))
        assert converted.shape == torch_shapes[rule.torch_name], rule.official_name
    total = sum(int(np.prod(shape)) for shape in expected.values())
    assert abs(total - {"base": 166.4e6, "large": 465.4e6}[size]) < 0.1e6


@pytest.mark.parametrize("protocol", [2, 4])
def test_cli_converts_a_released_file_into_a_loadable_checkpoint(protocol: int, tmp_path: Path, shared_data: Path) -> None:
    tiny = model_config("tiny").clip_config()
    dims = Dims(
        tiny.vision_config.hidden_size,
        tiny.vision_config.num_hidden_layers,
        tiny.vision_config.num_attention_heads,
        tiny.vision_config.patch_size,
        tiny.vision_config.image_size,
        tiny.text_config.hidden_size,
        tiny.text_config.num_hidden_layers,
        tiny.text_config.num_attention_heads,
        embed_dim=tiny.projection_dim,
        head_heads=model_config("tiny").head.num_heads,
    )
    params = random_params(dims, seed=protocol)
    released = tmp_path / "magic_lens_clip_tiny.pkl"
    write_released_file(released, params, protocol)
    assert run_cli([str(released), "--size", "tiny", "--output", str(tmp_path / "converted")]) == 0
    model, _, preprocess = load_checkpoint(tmp_path / "converted")
    assert preprocess.image_size == dims.image_size
    assert_matches_official(model, params, shared_data, dims.image_size)


def test_wrong_size_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    released = tmp_path / "small.pkl"
    write_released_file(released, random_params(SMALL_CLIP_BASE_HEAD))
    assert run_cli([str(released), "--size", "large", "--output", str(tmp_path / "out")]) == 2
    message = capsys.readouterr().err
    assert "does not match MagicLens large" in message and "base checkpoint" in message
    assert not (tmp_path / "out").exists()


def test_a_wrong_shape_names_the_parameter() -> None:
    params = random_params(SMALL_CLIP_BASE_HEAD)
    params["contrastive_multimodal_pooler/pool_attn/per_dim_scale/per_dim_scale"] = np.zeros(64, np.float32)
    model = MagicLens(model_config("base", clip_config(SMALL_CLIP_BASE_HEAD)), bundled_clip_tokenizer())
    with pytest.raises(ConversionError, match=r"per_dim_scale has shape \(64,\).*needs \(256,\)"):
        load_official_params(model, params)


def test_reads_bfloat16_and_chunked_arrays(tmp_path: Path) -> None:
    values = np.array([[1.5, -2.0], [0.15625, 3.0]], dtype=np.float32)
    bfloat16 = (values.view(np.uint32) >> 16).astype(np.uint16)
    chunked = {
        "__msgpack_chunked_array__": True,
        "shape": {"0": 2, "1": 3},
        "chunks": {"0": np.arange(4, dtype=np.float32), "1": np.arange(4, 6, dtype=np.float32)},
    }
    # numpy cannot name bfloat16, so that leaf is packed by hand as flax packs it
    bfloat16_leaf = msgpack.ExtType(1, msgpack.packb(((2, 2), "bfloat16", bfloat16.tobytes()), use_bin_type=True))
    chunks = {key: msgpack.ExtType(1, msgpack.packb((c.shape, c.dtype.name, c.tobytes()), use_bin_type=True)) for key, c in chunked["chunks"].items()}
    tree = {"params": {"a": {"b": {**chunked, "chunks": chunks}}, "c": bfloat16_leaf}}
    (tmp_path / "tree.msgpack").write_bytes(msgpack.packb(tree))
    params = read_official_params(tmp_path / "tree.msgpack")
    assert set(params) == {"a/b", "c"}
    np.testing.assert_array_equal(params["a/b"], np.arange(6, dtype=np.float32).reshape(2, 3))
    np.testing.assert_array_equal(params["c"], values)


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_runs_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    hostile = tmp_path / "hostile.pkl"
    hostile.write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(ConversionError, match="refusing to load"):
        read_official_params(hostile)
    assert not marker.exists()


def test_not_a_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    text = tmp_path / "notes.pkl"
    text.write_bytes(pickle.dumps("just a string"))
    with pytest.raises(ConversionError, match="holds a str, not a parameter tree"):
        read_official_params(text)


@pytest.mark.slow
def test_full_size_base_file_converts_and_matches(tmp_path: Path, shared_data: Path) -> None:
    """The whole released-size base model (166M parameters, a 666 MB file) through the command."""
    params = random_params(RELEASED["base"], seed=7)
    released = tmp_path / "magic_lens_clip_base.pkl"
    write_released_file(released, params)
    assert run_cli([str(released), "--size", "base", "--output", str(tmp_path / "base")]) == 0
    released.unlink()
    model, _, _ = load_checkpoint(tmp_path / "base")
    assert_matches_official(model, params, shared_data, 224)
