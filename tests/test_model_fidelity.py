"""The model's inputs are the released MagicLens inputs: token ids, the text attention mask, pixels.

References: google-deepmind/magiclens (data_utils.py `process_img`, model.py, layers.py), Scenic's
CLIP (projects/baselines/clip tokenizer.py and layers.py `TextEncoder`) and OpenAI's SimpleTokenizer.
The token ids of ../shared/data/official/clip_tokens.json were written by the official tokenizer.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from magiclens.model.config import model_config
from magiclens.model.magiclens import MagicLens
from magiclens.model.preprocess import CLIP_MEAN, CLIP_STD, PreprocessConfig, decode_image, images_to_model_input, to_model_input
from magiclens.model.tokenizer import bundled_clip_tokenizer, clean_text, tokenize

START, END = 49406, 49407

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return bundled_clip_tokenizer()


@pytest.fixture(scope="module")
def official_tokens(shared_data: Path) -> dict:
    return json.loads((shared_data / "official" / "clip_tokens.json").read_text())


# ---- token ids ----


def test_ids_are_the_official_tokenizers_for_all_150_strings(tokenizer, official_tokens) -> None:
    strings, expected = official_tokens["strings"], official_tokens["ids"]
    assert len(strings) == len(expected) == 150
    ours = tokenize(tokenizer, strings).tolist()
    for text, got, want in zip(strings, ours, expected):
        end = want.index(END)
        assert got[: end + 1] == want[: end + 1], text
        assert got == want, text  # padded with 0, as the official tokenizer pads
    # the set covers what the cleaning is for: HTML entities, mojibake, full-width forms
    assert any("&amp;" in s for s in strings) and any("Ã" in s for s in strings) and any("Ｆ" in s for s in strings)


def test_cleaning_is_simple_tokenizers() -> None:
    assert clean_text("  Café &amp;amp; BAR\t\n– “menu”  ") == "café & bar – \"menu\""
    assert clean_text("CafÃ© sign") == "café sign"  # ftfy repairs mojibake
    assert clean_text("the same jacket &mdash; size M") == "the same jacket — size m"


def _plain_strings(official_tokens: dict) -> list[tuple[str, list[int]]]:
    """Strings that clean to themselves apart from case, with their content ids (no start/end)."""
    pairs = []
    for text, ids in zip(official_tokens["strings"], official_tokens["ids"]):
        if text.isascii() and "&" not in text and " ".join(text.split()) == text:
            pairs.append((text, ids[1 : ids.index(END)]))
    return pairs


def test_long_text_is_truncated_with_the_end_token_last_as_official_truncate(tokenizer, official_tokens) -> None:
    """Words never merge across a space, so the ids of strings joined by spaces are their ids joined."""
    texts, content = [], []
    for text, ids in _plain_strings(official_tokens):
        texts.append(text)
        content += ids
        if len(content) > 100:
            break
    assert len(content) > 100
    ids = tokenize(tokenizer, [" ".join(texts)])
    assert ids[0].tolist() == [START] + content[:75] + [END]
    assert tokenize(tokenizer, [" ".join(texts)], fixed_length=False)[0].tolist() == [START] + content[:75] + [END]


# ---- the text attention mask: every id 0 is masked, not only the padding ----

INSTRUCTION_WITH_ID_0 = "add a dog!; make it sunny"


def _reference_text_embedding(model: MagicLens, ids: torch.Tensor, mask_zero_ids: bool) -> torch.Tensor:
    """Scenic's CLIP TextEncoder written out by hand on our weights: attention mask = causal AND
    (query id > 0 and key id > 0) when mask_zero_ids, else causal only; pooled at argmax(ids)."""
    text = model.clip.text_model
    length = ids.shape[1]
    x = text.embeddings.token_embedding.weight[ids] + text.embeddings.position_embedding.weight[:length]
    allowed = torch.ones(length, length).tril().bool().expand(ids.shape[0], 1, length, length)
    if mask_zero_ids:
        valid = ids > 0
        allowed = allowed & valid[:, None, :, None] & valid[:, None, None, :]
    for layer in text.encoder.layers:
        attn = layer.self_attn
        heads, head_dim = attn.num_heads, attn.head_dim
        h = layer.layer_norm1(x)
        q, k, v = (proj(h).view(*h.shape[:2], heads, head_dim).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        logits = (q @ k.transpose(-1, -2)) / math.sqrt(head_dim)
        # a fully masked row (the query is an id 0) is uniform, as in Flax; nothing reads it
        logits = torch.where(allowed, logits, torch.finfo(logits.dtype).min)
        out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(x.shape)
        x = x + attn.out_proj(out)
        h = layer.mlp.fc1(layer.layer_norm2(x))
        x = x + layer.mlp.fc2(h * torch.sigmoid(1.702 * h))
    x = text.final_layer_norm(x)
    pooled = x[torch.arange(ids.shape[0]), ids.argmax(-1)]
    return model.clip.text_projection(pooled)


@pytest.fixture(scope="module")
def tiny_model(tokenizer) -> MagicLens:
    torch.manual_seed(0)
    return MagicLens(model_config("tiny"), tokenizer).eval()


def test_id_0_inside_an_instruction_is_masked_as_released(tiny_model, tokenizer) -> None:
    ids = tokenize(tokenizer, [INSTRUCTION_WITH_ID_0, "add a dog; make it sunny"])
    end = ids[0].tolist().index(END)
    assert 0 in ids[0, 1:end].tolist()  # "!" followed by ";" does not merge: the symbol "!", id 0
    assert 0 not in ids[1, 1 : ids[1].tolist().index(END)].tolist()
    with torch.no_grad():
        ours = tiny_model.encode_texts(ids)
        masked = _reference_text_embedding(tiny_model, ids, mask_zero_ids=True)
        unmasked = _reference_text_embedding(tiny_model, ids, mask_zero_ids=False)
    torch.testing.assert_close(ours, masked, atol=1e-5, rtol=1e-5)
    # the mask changes the embedding of the instruction with a "!" ...
    assert (masked[0] - unmasked[0]).abs().max() > 1e-2
    # ... and of nothing else: trailing 0s come after the end token, which causal attention never reads
    torch.testing.assert_close(masked[1], unmasked[1], atol=1e-5, rtol=1e-5)


def test_the_mask_reaches_the_multimodal_embedding(tiny_model) -> None:
    torch.manual_seed(1)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        embedded = tiny_model.embed(images, [INSTRUCTION_WITH_ID_0])
        ids = tokenize(tiny_model.tokenizer, [INSTRUCTION_WITH_ID_0], fixed_length=False)
        image_embeds = tiny_model.encode_images(images)
        masked = tiny_model.fuse(image_embeds, _reference_text_embedding(tiny_model, ids, mask_zero_ids=True))
        unmasked = tiny_model.fuse(image_embeds, _reference_text_embedding(tiny_model, ids, mask_zero_ids=False))
    torch.testing.assert_close(embedded, masked, atol=1e-5, rtol=1e-5)
    assert (embedded - unmasked).abs().max() > 1e-3


# ---- pixels: data_utils.process_img, then the model's (no-op) crop and resize, then CLIP's normalisation ----


def _jax_resize_weights(in_size: int, out_size: int) -> np.ndarray:
    """jax.image.resize(method="bilinear", antialias=True) along one axis, as a matrix (in, out):
    a triangle kernel widened by the downscale factor, sampled at output pixel centres, each
    column normalised to sum 1 over the input pixels it reaches."""
    inv_scale = in_size / out_size
    kernel_scale = max(inv_scale, 1.0)
    sample = (np.arange(out_size) + 0.5) * inv_scale - 0.5
    distance = np.abs(sample[None, :] - np.arange(in_size)[:, None]) / kernel_scale
    weights = np.maximum(0.0, 1.0 - distance)
    return weights / weights.sum(axis=0, keepdims=True)


def _official_pixels(path: Path, size: int = 224) -> np.ndarray:
    """(3, size, size): Image.open().convert("RGB") (no EXIF rotation), / (max + 1e-12), resize in
    float, (x - mean) / std; the model's own crop and resize are no-ops on a size x size image."""
    image = np.asarray(Image.open(path).convert("RGB")).astype(np.float64)
    image = image / (image.max() + 1e-12)
    rows, cols = _jax_resize_weights(image.shape[0], size), _jax_resize_weights(image.shape[1], size)
    resized = np.einsum("iwc,wj->ijc", np.einsum("hwc,hi->iwc", image, rows), cols)
    return ((resized - np.array(CLIP_MEAN)) / np.array(CLIP_STD)).transpose(2, 0, 1)


PHOTOS = [
    "photos/skimage/chelsea.png",  # 451x300 RGB: downscaled, aspect ratio squashed
    "photos/matplotlib/grace_hopper.jpg",  # 512x600 JPEG
    "photos/skimage/coins.png",  # grayscale
    "photos/skimage/horse.png",  # RGBA
    "photos/skimage/microaneurysms.png",  # 102x102: upscaled
    "edgecases/pillow_hopper_orientation_6.jpg",  # EXIF orientation 6: not rotated on this path
]


@pytest.mark.parametrize("name", PHOTOS)
def test_official_path_pixels_match_the_released_formula(shared_data: Path, name: str) -> None:
    path = shared_data / "images" / name
    pixels, max_value = decode_image(path.read_bytes(), 224, exif_transpose=False, float_resize=True)
    assert pixels.dtype == torch.float32 and max_value == 1.0
    ours = to_model_input(pixels[None], torch.tensor([max_value]), PreprocessConfig())[0].numpy()
    # the same computation; float32 here against float64 there: 1e-4 after normalisation is 3e-5
    # in [0, 1], a hundredth of one level of 255 (resizing in uint8 is off by up to half a level)
    assert np.abs(ours - _official_pixels(path)).max() < 1e-4
    batch = images_to_model_input([path.read_bytes()], PreprocessConfig(), exif_transpose=False, float_resize=True)
    np.testing.assert_array_equal(batch[0].numpy(), ours)


def test_the_uint8_path_is_further_from_the_released_pixels(shared_data: Path) -> None:
    """Why evaluation takes the float path: uint8 resizing rounds every pixel to a level of 255."""
    path = shared_data / "images/photos/skimage/chelsea.png"
    pixels, max_value = decode_image(path.read_bytes(), 224, exif_transpose=False)
    assert pixels.dtype == torch.uint8
    rounded = to_model_input(pixels[None], torch.tensor([max_value]), PreprocessConfig())[0].numpy()
    error = np.abs(rounded - _official_pixels(path))
    assert 100 * 1e-4 < error.max() < 1.5 / max_value / min(CLIP_STD)


def test_exif_orientation_is_a_choice(shared_data: Path) -> None:
    """The official path decodes the image as stored (checked against the formula above); with
    exif_transpose the same pixels come upright."""
    path = shared_data / "images/edgecases/pillow_hopper_orientation_6.jpg"
    as_stored, _ = decode_image(path.read_bytes(), 64, exif_transpose=False, float_resize=True)
    upright, _ = decode_image(path.read_bytes(), 64, exif_transpose=True, float_resize=True)
    # orientation 6: to be shown, the stored image turns a quarter clockwise
    torch.testing.assert_close(upright, torch.rot90(as_stored, k=-1, dims=(1, 2)), atol=1e-5, rtol=1e-5)
    assert (upright - as_stored).abs().mean() > 0.1
