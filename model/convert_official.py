"""`magiclens convert-official`: the released MagicLens weights (Flax) -> a checkpoint of this project.

The released files (magic_lens_clip_base.pkl, magic_lens_clip_large.pkl) are a pickle of one bytes
object: the Flax parameter tree serialised by flax.serialization.to_bytes, i.e. msgpack whose
arrays are extension objects (type 1: msgpack of (shape, dtype name, C-order buffer); type 3: a
numpy scalar the same way; arrays over 1 GiB split into "__msgpack_chunked_array__" dicts). This
module reads that format with msgpack alone (no JAX, no Flax), and unpickles with an allow-list:
a pickle that asks for anything but bytes or numpy arrays is refused, since unpickling runs code.

The parameter tree, and where each leaf goes (Flax kernels are (in, out), torch weights (out, in)):

    clip/visual/...                 Scenic CLIP ViT (use_underscore_module_name: resblocks_{i}):
        conv1/kernel (P, P, 3, W)       -> vision_model.embeddings.patch_embedding.weight (W, 3, P, P)
        class_embedding, positional_embedding, ln_pre, ln_post, proj/kernel
        transformer/resblocks_{i}/ln_1, ln_2, mlp/c_fc, mlp/c_proj,
            attn/{query,key,value}/kernel (W, heads, head_dim), bias (heads, head_dim)
            attn/out/kernel (heads, head_dim, W), bias (W)
    clip/text/...                   token_embedding/embedding, positional_embedding, ln_final,
                                    text_projection/kernel, transformer/resblocks_{i}/... as above
    clip/logit_scale
    multimodal_encoder/x_layers_{i}/layer_norm, self_attention/{query,key,value,post}/{w,b},
        ff_layer/layer_norm, ff_layer/ffn_layer{1,2}/linear/w, ff_layer/ffn_layer{1,2}/bias/b
    contrastive_multimodal_pooler/pooling_attn_query, pool_attn/{query,key,value,post}/{w,b},
        pool_attn/per_dim_scale/per_dim_scale, pool_attn_ln

Scenic's CLIP LayerNorms are plain flax LayerNorms (weight stored as is); the MagicLens head's keep
the weight as an offset from 1, exactly as this project's LayerNorm does, so both copy unchanged.
"""

from __future__ import annotations

import argparse
import io
import pickle
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import torch

from magiclens.model.arguments import add_convert_official_arguments as add_arguments  # noqa: F401 - re-exported
from magiclens.model.checkpoint import save_checkpoint
from magiclens.model.config import ModelConfig, model_config
from magiclens.model.magiclens import MagicLens
from magiclens.model.preprocess import PreprocessConfig
from magiclens.model.tokenizer import bundled_clip_tokenizer

_EXT_NDARRAY = 1
_EXT_NPSCALAR = 3
_CHUNKED = "__msgpack_chunked_array__"


class ConversionError(ValueError):
    """The file is not a released MagicLens checkpoint of the requested size."""


# --- reading the released file ------------------------------------------------------------------


class _AllowListUnpickler(pickle.Unpickler):
    """Unpickles bytes, and numpy arrays, nothing else."""

    ALLOWED = {
        ("_codecs", "encode"),  # how protocol 2 pickles bytes
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise ConversionError(
                f"the pickle asks for {module}.{name}, which a released MagicLens checkpoint never needs; "
                "refusing to load it (unpickling can run code)"
            )
        return super().find_class(module, name)


def _array_from_msgpack(data: bytes) -> np.ndarray:
    shape, dtype_name, buffer = msgpack.unpackb(data, raw=True)
    name = dtype_name.decode() if isinstance(dtype_name, bytes) else dtype_name
    if name == "bfloat16":  # numpy has no bfloat16: widen the 16 bits to float32's top half
        bits = np.frombuffer(buffer, dtype=np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    return np.frombuffer(buffer, dtype=np.dtype(name)).reshape(shape)


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _EXT_NDARRAY:
        return _array_from_msgpack(data)
    if code == _EXT_NPSCALAR:
        return _array_from_msgpack(data)[()]
    raise ConversionError(f"unexpected msgpack extension type {code} in the parameter tree")


def _unchunk(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    if node.get(_CHUNKED):
        shape = tuple(node["shape"][str(i)] for i in range(len(node["shape"])))
        chunks = [node["chunks"][str(i)] for i in range(len(node["chunks"]))]
        return np.concatenate(chunks).reshape(shape)
    return {key: _unchunk(value) for key, value in node.items()}


def _flatten(node: Any, prefix: str = "") -> Iterator[tuple[str, np.ndarray]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _flatten(value, f"{prefix}{key}/")
    else:
        yield prefix.rstrip("/"), np.asarray(node)


def read_official_params(path: str | Path) -> dict[str, np.ndarray]:
    """The released file's parameters, flat: {"clip/visual/conv1/kernel": array, ...}.

    Accepts the released format (a pickled msgpack bytes object), the bare msgpack bytes, or a
    pickled nested dict of numpy arrays; a leading "params" level is dropped.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ConversionError(f"cannot read {path}: {error.strerror or error}") from error
    payload: Any = data
    if data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        try:
            payload = _AllowListUnpickler(io.BytesIO(data)).load()
        except ConversionError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError) as error:
            raise ConversionError(f"{path} is not a readable pickle: {error}") from error
    if isinstance(payload, (bytes, bytearray)):
        try:
            payload = msgpack.unpackb(payload, ext_hook=_ext_hook, raw=False, strict_map_key=False)
        except ConversionError:
            raise
        except (msgpack.UnpackException, ValueError) as error:
            raise ConversionError(f"{path} does not hold a Flax (msgpack) parameter tree: {error}") from error
    if not isinstance(payload, dict):
        raise ConversionError(f"{path} holds a {type(payload).__name__}, not a parameter tree")
    tree = _unchunk(payload)
    if set(tree) == {"params"}:
        tree = tree["params"]
    return dict(_flatten(tree))


# --- the name and layout map --------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One torch parameter, the official leaf it comes from, and how the layout changes."""

    torch_name: str
    official_name: str
    official_shape: tuple[int, ...]
    transform: Callable[[np.ndarray], np.ndarray]


def _same(x: np.ndarray) -> np.ndarray:
    return x


def _dense(x: np.ndarray) -> np.ndarray:  # (in, out) -> (out, in)
    return x.T


def _heads_in(x: np.ndarray) -> np.ndarray:  # (in, heads, head_dim) -> (heads * head_dim, in)
    return x.reshape(x.shape[0], -1).T


def _heads_bias(x: np.ndarray) -> np.ndarray:  # (heads, head_dim) -> (heads * head_dim)
    return x.reshape(-1)


def _heads_out(x: np.ndarray) -> np.ndarray:  # flax attention out: (heads, head_dim, out) -> (out, heads * head_dim)
    return x.reshape(-1, x.shape[-1]).T


def _post(x: np.ndarray) -> np.ndarray:  # MagicLens post, "...NH,DNH->...D": (D, heads, head_dim) -> (D, heads * head_dim)
    return x.reshape(x.shape[0], -1)


def _conv(x: np.ndarray) -> np.ndarray:  # (P, P, in, out) -> (out, in, P, P)
    return x.transpose(3, 2, 0, 1)


def _clip_block(torch_prefix: str, official_prefix: str, width: int, heads: int) -> Iterator[Rule]:
    t, o, hd = torch_prefix, official_prefix, width // heads
    for side in ("1", "2"):
        yield Rule(f"{t}.layer_norm{side}.weight", f"{o}/ln_{side}/scale", (width,), _same)
        yield Rule(f"{t}.layer_norm{side}.bias", f"{o}/ln_{side}/bias", (width,), _same)
    for torch_proj, flax_proj in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
        yield Rule(f"{t}.self_attn.{torch_proj}.weight", f"{o}/attn/{flax_proj}/kernel", (width, heads, hd), _heads_in)
        yield Rule(f"{t}.self_attn.{torch_proj}.bias", f"{o}/attn/{flax_proj}/bias", (heads, hd), _heads_bias)
    yield Rule(f"{t}.self_attn.out_proj.weight", f"{o}/attn/out/kernel", (heads, hd, width), _heads_out)
    yield Rule(f"{t}.self_attn.out_proj.bias", f"{o}/attn/out/bias", (width,), _same)
    yield Rule(f"{t}.mlp.fc1.weight", f"{o}/mlp/c_fc/kernel", (width, 4 * width), _dense)
    yield Rule(f"{t}.mlp.fc1.bias", f"{o}/mlp/c_fc/bias", (4 * width,), _same)
    yield Rule(f"{t}.mlp.fc2.weight", f"{o}/mlp/c_proj/kernel", (4 * width, width), _dense)
    yield Rule(f"{t}.mlp.fc2.bias", f"{o}/mlp/c_proj/bias", (width,), _same)


def _layer_norm(torch_prefix: str, official_prefix: str, width: int, torch_weight: str = "weight") -> Iterator[Rule]:
    yield Rule(f"{torch_prefix}.{torch_weight}", f"{official_prefix}/scale", (width,), _same)
    yield Rule(f"{torch_prefix}.bias", f"{official_prefix}/bias", (width,), _same)


def _head_attention(torch_prefix: str, official_prefix: str, dim: int, hidden: int, heads: int) -> Iterator[Rule]:
    t, o, hd = torch_prefix, official_prefix, hidden // heads
    for projection in ("query", "key", "value"):
        yield Rule(f"{t}.{projection}.weight", f"{o}/{projection}/w", (dim, heads, hd), _heads_in)
        yield Rule(f"{t}.{projection}.bias", f"{o}/{projection}/b", (heads, hd), _heads_bias)
    yield Rule(f"{t}.post.weight", f"{o}/post/w", (dim, heads, hd), _post)
    yield Rule(f"{t}.post.bias", f"{o}/post/b", (dim,), _same)


def conversion_rules(config: ModelConfig) -> list[Rule]:
    """Every parameter of MagicLens(config), with its official name and shape."""
    clip = config.clip_config()
    vision, text, head = clip.vision_config, clip.text_config, config.head
    width, patch = vision.hidden_size, vision.patch_size
    positions = (vision.image_size // patch) ** 2 + 1
    rules = [Rule("clip.logit_scale", "clip/logit_scale", (), _same)]

    v, ov = "clip.vision_model", "clip/visual"
    rules += [
        Rule(f"{v}.embeddings.class_embedding", f"{ov}/class_embedding", (width,), _same),
        Rule(f"{v}.embeddings.patch_embedding.weight", f"{ov}/conv1/kernel", (patch, patch, 3, width), _conv),
        Rule(f"{v}.embeddings.position_embedding.weight", f"{ov}/positional_embedding", (positions, width), _same),
        *_layer_norm(f"{v}.pre_layrnorm", f"{ov}/ln_pre", width),
        *_layer_norm(f"{v}.post_layernorm", f"{ov}/ln_post", width),
        Rule("clip.visual_projection.weight", f"{ov}/proj/kernel", (width, clip.projection_dim), _dense),
    ]
    for i in range(vision.num_hidden_layers):
        rules += _clip_block(f"{v}.encoder.layers.{i}", f"{ov}/transformer/resblocks_{i}", width, vision.num_attention_heads)

    t, ot, text_width = "clip.text_model", "clip/text", text.hidden_size
    rules += [
        Rule(f"{t}.embeddings.token_embedding.weight", f"{ot}/token_embedding/embedding", (text.vocab_size, text_width), _same),
        Rule(f"{t}.embeddings.position_embedding.weight", f"{ot}/positional_embedding", (text.max_position_embeddings, text_width), _same),
        *_layer_norm(f"{t}.final_layer_norm", f"{ot}/ln_final", text_width),
        Rule("clip.text_projection.weight", f"{ot}/text_projection/kernel", (text_width, clip.projection_dim), _dense),
    ]
    for i in range(text.num_hidden_layers):
        rules += _clip_block(f"{t}.encoder.layers.{i}", f"{ot}/transformer/resblocks_{i}", text_width, text.num_attention_heads)

    dim, heads = head.embed_dim, head.num_heads
    for i in range(head.num_layers):
        m, om = f"multimodal_encoder.x_layers.{i}", f"multimodal_encoder/x_layers_{i}"
        rules += [
            *_layer_norm(f"{m}.layer_norm", f"{om}/layer_norm", dim, torch_weight="scale"),
            *_head_attention(f"{m}.self_attention", f"{om}/self_attention", dim, dim, heads),
            *_layer_norm(f"{m}.ff_layer.layer_norm", f"{om}/ff_layer/layer_norm", dim, torch_weight="scale"),
            Rule(f"{m}.ff_layer.ffn_layer1.weight", f"{om}/ff_layer/ffn_layer1/linear/w", (dim, head.ffn_hidden_dim), _dense),
            Rule(f"{m}.ff_layer.ffn_layer1.bias", f"{om}/ff_layer/ffn_layer1/bias/b", (head.ffn_hidden_dim,), _same),
            Rule(f"{m}.ff_layer.ffn_layer2.weight", f"{om}/ff_layer/ffn_layer2/linear/w", (head.ffn_hidden_dim, dim), _dense),
            Rule(f"{m}.ff_layer.ffn_layer2.bias", f"{om}/ff_layer/ffn_layer2/bias/b", (dim,), _same),
        ]
    p, op = "contrastive_multimodal_pooler", "contrastive_multimodal_pooler"
    rules += [
        Rule(f"{p}.pooling_attn_query", f"{op}/pooling_attn_query", (head.num_query_tokens, dim), _same),
        *_head_attention(f"{p}.pool_attn", f"{op}/pool_attn", dim, head.pooler_hidden_dim, heads),
        Rule(
            f"{p}.pool_attn.per_dim_scale.per_dim_scale",
            f"{op}/pool_attn/per_dim_scale/per_dim_scale",
            (head.pooler_hidden_dim // heads,),
            _same,
        ),
        *_layer_norm(f"{p}.pool_attn_ln", f"{op}/pool_attn_ln", dim, torch_weight="scale"),
    ]
    return rules


def check_official_params(params: dict[str, np.ndarray], config: ModelConfig, size_hint: str = "") -> list[Rule]:
    """The conversion rules of `config`, after checking that the official parameters have exactly
    their names and shapes (before any model is built: a wrong file fails at once)."""
    rules = conversion_rules(config)
    missing = [rule.official_name for rule in rules if rule.official_name not in params]
    unexpected = sorted(set(params) - {rule.official_name for rule in rules})
    hint = f" Is this the {size_hint} checkpoint? Give the --size it was released as." if size_hint else ""
    if missing or unexpected:
        raise ConversionError(
            f"the parameter tree does not match MagicLens {config.name}: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}).{hint}"
        )
    for rule in rules:
        if params[rule.official_name].shape != rule.official_shape:
            raise ConversionError(
                f"{rule.official_name} has shape {params[rule.official_name].shape}, but MagicLens {config.name} "
                f"needs {rule.official_shape}.{hint}"
            )
    return rules


def load_official_params(model: MagicLens, params: dict[str, np.ndarray], size_hint: str = "") -> None:
    """Copy the official parameters into `model`; every parameter on both sides is used once."""
    rules = check_official_params(params, model.config, size_hint)
    torch_params = dict(model.named_parameters())
    unmapped = set(torch_params) - {rule.torch_name for rule in rules}
    if unmapped:  # the model grew a parameter that the map does not know: a bug here, not bad input
        raise RuntimeError(f"no official parameter is mapped to {sorted(unmapped)}")
    with torch.no_grad():
        for rule in rules:
            value = torch.from_numpy(np.array(rule.transform(params[rule.official_name]), dtype=np.float32, order="C"))
            torch_params[rule.torch_name].copy_(value.reshape(torch_params[rule.torch_name].shape))


def convert(path: str | Path, size: str) -> MagicLens:
    """The released checkpoint at `path` as a MagicLens `size` model."""
    params = read_official_params(path)
    config = model_config(size)
    other = {"base": "large", "large": "base"}.get(size, "")
    check_official_params(params, config, size_hint=other)
    model = MagicLens(config, bundled_clip_tokenizer())
    load_official_params(model, params)
    return model.eval()


def run(args: argparse.Namespace, extra: list[str]) -> int:
    try:
        model = convert(args.checkpoint, args.size)
    except ConversionError as error:
        print(f"magiclens convert-official: {error}", file=sys.stderr)
        return 2
    save_checkpoint(Path(args.output), model, PreprocessConfig(image_size=model.config.image_size), step=0)
    print(f"wrote {args.output}: MagicLens {args.size}, {sum(p.numel() for p in model.parameters()):,} parameters")
    return 0
