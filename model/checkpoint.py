"""Building models, and saving and loading checkpoints.

A checkpoint is a directory:

    magiclens.json       model configuration (head + CLIP config), preprocessing, training step
    model.safetensors    the weights (MagicLens state dict)
    tokenizer/           the tokenizer, so that loading needs no download and no bundled asset
    training_state.pt    optimizer, scheduler, data positions and RNG state (only to resume training)

A training run writes its checkpoints to OUTPUT/checkpoints/step-NNNNNNNN/ and points at the
newest from OUTPUT/latest.json, so OUTPUT itself can be given wherever a checkpoint is expected.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from transformers import CLIPModel, PreTrainedTokenizerBase

from magiclens.model.config import ModelConfig, model_config
from magiclens.model.magiclens import MagicLens
from magiclens.model.preprocess import PreprocessConfig
from magiclens.model.tokenizer import bundled_clip_tokenizer, load_tokenizer

CONFIG_FILE = "magiclens.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
TRAINING_STATE_FILE = "training_state.pt"
LATEST_FILE = "latest.json"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A path that is not a usable checkpoint."""


def build_model(name: str, backbone: str | None = None) -> tuple[MagicLens, PreprocessConfig]:
    """A new MagicLens `name`: a random CLIP of the configured size, or a pretrained `backbone`
    (a local directory or a Hugging Face hub id) with its own tokenizer."""
    if backbone is None:
        config = model_config(name)
        model = MagicLens(config, bundled_clip_tokenizer())
    else:
        clip = CLIPModel.from_pretrained(backbone)
        config = model_config(name, clip.config)
        model = MagicLens(config, load_tokenizer(backbone), clip)
    return model, PreprocessConfig(image_size=config.image_size)


def save_checkpoint(
    directory: Path,
    model: MagicLens,
    preprocess: PreprocessConfig,
    step: int,
    training_state: dict[str, Any] | None = None,
) -> None:
    """Write a checkpoint to `directory` (replaced whole if it exists, never left half-written)."""
    directory = Path(directory)
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    description = {
        "format": FORMAT_VERSION,
        "model": model.config.to_dict(),
        "preprocess": preprocess.to_dict(),
        "step": step,
    }
    (partial / CONFIG_FILE).write_text(json.dumps(description, indent=1) + "\n")
    save_model(model, str(partial / WEIGHTS_FILE))
    model.tokenizer.save_pretrained(str(partial / TOKENIZER_DIR))
    if training_state is not None:
        torch.save(training_state, partial / TRAINING_STATE_FILE)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(partial, directory)


def point_latest(output: Path, checkpoint: Path) -> None:
    """Make OUTPUT/latest.json name `checkpoint` (atomically)."""
    pointer = output / LATEST_FILE
    partial = pointer.with_suffix(".partial")
    partial.write_text(json.dumps({"checkpoint": os.path.relpath(checkpoint, output)}) + "\n")
    os.replace(partial, pointer)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a training output directory (its newest checkpoint)."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        return path
    if (path / LATEST_FILE).is_file():
        target = path / json.loads((path / LATEST_FILE).read_text())["checkpoint"]
        if (target / CONFIG_FILE).is_file():
            return target
        raise CheckpointError(f"{path / LATEST_FILE} names {target}, which is not a checkpoint")
    raise CheckpointError(
        f"{path} is not a checkpoint: it has neither {CONFIG_FILE} nor {LATEST_FILE} "
        "(give a directory written by `magiclens train --output`)"
    )


def read_description(path: str | Path) -> dict[str, Any]:
    description = json.loads((resolve_checkpoint(path) / CONFIG_FILE).read_text())
    if description.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {description.get('format')} is not {FORMAT_VERSION}")
    return description


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[MagicLens, PreTrainedTokenizerBase, PreprocessConfig]:
    """The model (in eval mode, on `device`), its tokenizer and its preprocessing."""
    directory = resolve_checkpoint(path)
    description = read_description(directory)
    config = ModelConfig.from_dict(description["model"])
    tokenizer = load_tokenizer(str(directory / TOKENIZER_DIR))
    model = MagicLens(config, tokenizer)
    load_model(model, str(directory / WEIGHTS_FILE), strict=True)
    model.to(device).eval()
    return model, tokenizer, PreprocessConfig.from_dict(description["preprocess"])


def load_training_state(path: str | Path) -> dict[str, Any]:
    directory = resolve_checkpoint(path)
    state_file = directory / TRAINING_STATE_FILE
    if not state_file.is_file():
        raise CheckpointError(f"{directory} holds no {TRAINING_STATE_FILE}, so training cannot resume from it")
    return torch.load(state_file, map_location="cpu", weights_only=True)
