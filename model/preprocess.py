"""Image preprocessing: the released MagicLens evaluation path.

The official code (magiclens data_utils.py `process_img`) opens the image without applying its
EXIF orientation, converts it to RGB, divides its pixels by the image's own maximum, resizes the
float image straight to 224x224 (jax.image.resize, bilinear with antialiasing, no cropping, so the
aspect ratio is not kept) and applies CLIP's mean and standard deviation.

The work is split in two so that the data-loader workers do the expensive part and ship small
tensors: `decode_image` (CPU, in a worker) gives the resized image plus its maximum;
`to_model_input` (on the device) turns a batch of those into normalised float pixels.

`decode_image` has two choices, made per use (docs/fidelity.md says which use takes which):
- float_resize=True is the official order: divide by the maximum, then resize in float32; the
  pixels come back already divided, with a maximum of 1.0. float_resize=False resizes in uint8
  (4 times smaller tensors, faster) and divides afterwards in `to_model_input`: within one level
  of 255 of the official pixels, fine for training.
- exif_transpose=False decodes the image as stored, as the official path does (benchmarks and
  converter parity need that); exif_transpose=True turns it upright first, which a phone photo
  (stored sideways with an orientation tag) needs.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class PreprocessConfig:
    image_size: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessConfig:
        return cls(
            image_size=int(data["image_size"]),
            mean=tuple(data["mean"]),  # type: ignore[arg-type]
            std=tuple(data["std"]),  # type: ignore[arg-type]
        )


class ImageDecodeError(ValueError):
    """The bytes are not an image that Pillow can decode safely."""


def decode_image(
    data: bytes, size: int, fast_jpeg: bool = False, *, exif_transpose: bool = True, float_resize: bool = False
) -> tuple[torch.Tensor, float]:
    """Decode, optionally orient upright (exif_transpose), convert to RGB and resize to
    (3, size, size); also the maximum that `to_model_input` divides by.

    float_resize=False: uint8 pixels resized, and the maximum of the full decoded image.
    float_resize=True (the released order): float32 pixels divided by the maximum of the full
    decoded image, then resized; the maximum returned is 1.0.
    With fast_jpeg, a large JPEG is decoded at a reduced DCT scale (1/2, 1/4 or 1/8, keeping both
    sides at least `size`), several times cheaper than a full decode, then resized the same way;
    the pixels then differ slightly from the released path (a mean of about 0.5% of the range on
    real photos), which is fine for training but not for evaluation.
    Raises ImageDecodeError for anything that is not a decodable image, including decompression
    bombs.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if fast_jpeg and image.format == "JPEG":
                image.draft("RGB", (size, size))
            if exif_transpose:
                ImageOps.exif_transpose(image, in_place=True)
            if image.mode != "RGB":
                image = image.convert("RGB")
            pixels = np.array(image)  # (H, W, 3)
    # Untrusted bytes: Pillow raises many kinds of error (OSError, ValueError, SyntaxError,
    # struct.error, DecompressionBombError, ...); every one of them means "not usable".
    except Exception as error:  # noqa: BLE001
        raise ImageDecodeError(f"{type(error).__name__}: {error}") from error
    if pixels.shape[0] == 0 or pixels.shape[1] == 0:
        raise ImageDecodeError("image has no pixels")
    max_value = float(pixels.max())  # numpy's: a torch reduction may spin up threads for this
    if float_resize:
        # the released code: x / (max + 1e-12) in float32, then resize; torch's antialiased bilinear
        # uses the same triangle kernel, widened by the downscale factor, as jax.image.resize
        scaled = pixels.astype(np.float32) / np.float32(max_value + 1e-12)
        chw = torch.from_numpy(scaled).permute(2, 0, 1).unsqueeze(0)
        return F.interpolate(chw, size=(size, size), mode="bilinear", antialias=True)[0], 1.0
    chw = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0)
    # torch's uint8 antialiased bilinear resize gives the same pixels as Pillow's BILINEAR, faster
    resized = F.interpolate(chw, size=(size, size), mode="bilinear", antialias=True)
    return resized[0], max_value


def to_model_input(
    pixels: torch.Tensor, max_values: torch.Tensor, config: PreprocessConfig
) -> torch.Tensor:
    """(B, 3, S, S) pixels and (B,) maxima from `decode_image` -> float32 pixels scaled to [0, 1] by
    each image's maximum (1.0 for float_resize pixels, already scaled), then normalised with CLIP's
    mean and std."""
    scale = 1.0 / max_values.to(torch.float32).clamp_min(1e-12)
    images = pixels.to(torch.float32) * scale.view(-1, 1, 1, 1)
    mean = torch.tensor(config.mean, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(config.std, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    return (images - mean) / std


def images_to_model_input(
    images: list[bytes], config: PreprocessConfig, *, exif_transpose: bool = True, float_resize: bool = False
) -> torch.Tensor:
    """Encoded images -> model input (B, 3, S, S) float32; raises ImageDecodeError on a bad one.
    exif_transpose, float_resize: see decode_image (False and True: the released path)."""
    decoded = [decode_image(data, config.image_size, exif_transpose=exif_transpose, float_resize=float_resize) for data in images]
    pixels = torch.stack([p for p, _ in decoded])
    max_values = torch.tensor([m for _, m in decoded])
    return to_model_input(pixels, max_values, config)
