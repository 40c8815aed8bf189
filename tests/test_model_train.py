"""`magiclens train` and `magiclens evaluate` end to end on real photos, with the tiny model."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from magiclens.cli import main
from magiclens.model.checkpoint import build_model, load_checkpoint
from magiclens.model.data import write_triplets
from magiclens.model.preprocess import images_to_model_input

ROOT = Path(__file__).resolve().parent.parent
UKBENCH = "images/neardup/imagededup-ukbench/base_images"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def triplet_file(tmp_path_factory, shared_data: Path) -> str:
    """10 triplets over 12 real photos: fewer rows than steps x batch, so epochs repeat."""
    photos = sorted((shared_data / UKBENCH).glob("*.jpg")) + [
        shared_data / "images/photos/skimage/chelsea.png",
        shared_data / "images/photos/skimage/coffee.png",
    ]
    images = [p.read_bytes() for p in photos]
    rows = [
        {
            "triplet_id": f"t{i}",
            "query_image": images[i],
            "instruction": f"another view number {i}",
            "target_image": images[(i + 1) % len(images)] if i != 9 else images[1],  # t0 and t9 share a target
        }
        for i in range(10)
    ]
    path = tmp_path_factory.mktemp("triplets") / "part-0.parquet"
    write_triplets(str(path), rows, row_group_size=4)
    return str(path)


def _train(*args: str) -> int:
    return main(["train", "--model", "tiny", "--log-every", "1", *args])


def test_train_then_evaluate_prints_one_json_object(triplet_file, tmp_path, capsys):
    output = tmp_path / "run"
    assert _train("--data", triplet_file, "--steps", "5", "--batch-size", "4", "--num-workers", "1", "--output", str(output)) == 0
    assert (output / "latest.json").is_file()
    assert list((output / "tensorboard").glob("events.out.tfevents.*"))
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(output), "--data", triplet_file, "--json", "--num-workers", "0"]) == 0
    printed = capsys.readouterr().out
    report = json.loads(printed)
    assert printed.strip().count("\n") == 0
    for key in ("recall@1", "recall@5", "recall@10", "recall@50", "mAP@5", "mAP@10", "mAP@25", "mAP@50"):
        assert 0.0 <= report[key] <= 1.0
    assert report["recall@50"] == 1.0  # the gallery is smaller than 50
    assert (report["triplets"], report["queries"], report["gallery"]) == (10, 10, 9)
    assert report["rejected"] == {}


def test_checkpoint_loads_into_an_embedder(triplet_file, tmp_path, shared_data):
    output = tmp_path / "run"
    assert _train("--data", triplet_file, "--steps", "2", "--batch-size", "4", "--num-workers", "0", "--output", str(output)) == 0
    model, tokenizer, preprocess = load_checkpoint(output, "cpu")
    assert preprocess.image_size == 64 and len(tokenizer) == 49408
    photos = [(shared_data / "images/photos/skimage" / name).read_bytes() for name in ("coffee.png", "rocket.jpg")]
    pixels = images_to_model_input(photos, preprocess)
    assert pixels.shape == (2, 3, 64, 64) and pixels.dtype == torch.float32
    embeddings = model.embed(pixels, ["in the snow", ""])
    assert embeddings.shape == (2, 64) and embeddings.dtype == torch.float32
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(2))
    # the checkpoint's model is the trained one: same embeddings as the model that training saved
    again, _, _ = load_checkpoint(output / "checkpoints/step-00000002", "cpu")
    torch.testing.assert_close(again.embed(pixels, ["in the snow", ""]), embeddings)


def test_resumed_training_ends_with_the_weights_of_an_uninterrupted_run(triplet_file, tmp_path):
    common = ["--data", triplet_file, "--steps", "6", "--batch-size", "4", "--save-every", "3",
              "--num-workers", "2", "--shuffle-buffer", "6", "--lr", "1e-3"]  # fmt: skip
    uninterrupted = tmp_path / "uninterrupted"
    assert _train(*common, "--output", str(uninterrupted)) == 0
    # the run that stopped after step 3: its output as it was then
    interrupted = tmp_path / "interrupted"
    (interrupted / "checkpoints").mkdir(parents=True)
    shutil.copytree(uninterrupted / "checkpoints/step-00000003", interrupted / "checkpoints/step-00000003")
    (interrupted / "latest.json").write_text(json.dumps({"checkpoint": "checkpoints/step-00000003"}))
    assert _train(*common, "--output", str(interrupted), "--resume") == 0

    final = load_file(uninterrupted / "checkpoints/step-00000006/model.safetensors")
    resumed = load_file(interrupted / "checkpoints/step-00000006/model.safetensors")
    middle = load_file(uninterrupted / "checkpoints/step-00000003/model.safetensors")
    assert final.keys() == resumed.keys()
    assert all(torch.equal(final[k], resumed[k]) for k in final)
    assert any(not torch.equal(final[k], middle[k]) for k in final)  # steps 4-6 did change them


def checkpoint_names(output: Path) -> list[str]:
    return sorted(path.name for path in (output / "checkpoints").iterdir())


def test_only_the_newest_checkpoints_are_kept_and_a_rotated_run_still_resumes(triplet_file, tmp_path):
    common = ["--data", triplet_file, "--steps", "6", "--batch-size", "4", "--save-every", "2", "--num-workers", "0",
              "--lr", "1e-3"]  # fmt: skip
    uninterrupted = tmp_path / "uninterrupted"
    assert _train(*common, "--keep-checkpoints", "2", "--output", str(uninterrupted)) == 0
    assert checkpoint_names(uninterrupted) == ["step-00000004", "step-00000006"]  # step 2 was rotated out
    assert json.loads((uninterrupted / "latest.json").read_text()) == {"checkpoint": "checkpoints/step-00000006"}

    # a run that stopped after step 4 with its newest checkpoint, resumed keeping only 1 checkpoint
    interrupted = tmp_path / "interrupted"
    (interrupted / "checkpoints").mkdir(parents=True)
    shutil.copytree(uninterrupted / "checkpoints/step-00000004", interrupted / "checkpoints/step-00000004")
    (interrupted / "latest.json").write_text(json.dumps({"checkpoint": "checkpoints/step-00000004"}))
    assert _train(*common, "--keep-checkpoints", "1", "--output", str(interrupted), "--resume") == 0
    assert checkpoint_names(interrupted) == ["step-00000006"]
    assert json.loads((interrupted / "latest.json").read_text()) == {"checkpoint": "checkpoints/step-00000006"}
    final = load_file(uninterrupted / "checkpoints/step-00000006/model.safetensors")
    resumed = load_file(interrupted / "checkpoints/step-00000006/model.safetensors")
    assert final.keys() == resumed.keys() and all(torch.equal(final[k], resumed[k]) for k in final)


def test_frozen_backbone_fixed_temperature_and_accumulation(triplet_file, tmp_path):
    output = tmp_path / "run"
    args = ["--data", triplet_file, "--steps", "2", "--batch-size", "3", "--grad-accum", "2", "--num-workers", "0",
            "--freeze-backbone", "--fixed-temperature", "--temperature", "0.05", "--output", str(output)]  # fmt: skip
    assert _train(*args) == 0
    trained = load_file(output / "checkpoints/step-00000002/model.safetensors")
    torch.manual_seed(0)  # the trainer's default seed: the same initial weights
    initial = build_model("tiny")[0].state_dict()
    clip_names = [k for k in trained if k.startswith("clip.") and k != "clip.logit_scale"]
    assert all(torch.equal(trained[k], initial[k]) for k in clip_names)
    assert trained["clip.logit_scale"].item() == pytest.approx(math.log(1 / 0.05))
    head = [k for k in trained if not k.startswith("clip.")]
    assert any(not torch.equal(trained[k], initial[k]) for k in head)


def test_mistakes_get_messages_that_say_what_to_do(triplet_file, tmp_path, capsys):
    with pytest.raises(SystemExit, match="holds no checkpoint"):
        _train("--data", triplet_file, "--output", str(tmp_path / "new"), "--resume")
    output = tmp_path / "done"
    assert _train("--data", triplet_file, "--steps", "1", "--batch-size", "2", "--num-workers", "0", "--output", str(output)) == 0
    with pytest.raises(SystemExit, match="pass --resume"):
        _train("--data", triplet_file, "--output", str(output))
    with pytest.raises(SystemExit, match="changed: batch_size 2 -> 3"):
        _train("--data", triplet_file, "--steps", "2", "--batch-size", "3", "--num-workers", "0", "--output", str(output), "--resume")
    capsys.readouterr()
    assert _train("--data", str(tmp_path / "missing-*.parquet"), "--output", str(tmp_path / "x")) == 2
    assert "no file matches" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(tmp_path), "--data", triplet_file]) == 2
    assert "is not a checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_two_process_ddp_training_with_gloo(triplet_file, tmp_path):
    output = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "magiclens", "train", "--model", "tiny", "--data", triplet_file, "--steps", "4",
               "--batch-size", "3", "--save-every", "2", "--num-workers", "1", "--output", str(output)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    finished = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    # the trainer checks at the end that both replicas hold the same weights; each rank read its own rows
    state = torch.load(output / "checkpoints/step-00000004/training_state.pt", weights_only=True)
    assert state["setup"]["world_size"] == 2
    assert [d["batches"] for d in state["data"]] == [4, 4]
    model, _, _ = load_checkpoint(output)
    assert model.embed(torch.zeros(1, 3, 64, 64), ["x"]).shape == (1, 64)


def test_pretrained_backbone_from_a_local_directory(tmp_path):
    """--backbone loads CLIP weights and tokenizer from a directory (a hub id goes the same way)."""
    from transformers import CLIPModel

    from magiclens.model.config import default_clip_config
    from magiclens.model.tokenizer import bundled_clip_tokenizer

    torch.manual_seed(123)
    pretrained = CLIPModel(default_clip_config("tiny"))
    pretrained.save_pretrained(tmp_path / "clip")
    bundled_clip_tokenizer().save_pretrained(tmp_path / "clip")
    model, preprocess = build_model("tiny", str(tmp_path / "clip"))
    saved = pretrained.state_dict()
    assert all(torch.equal(value, saved[name]) for name, value in model.clip.state_dict().items())
    assert model.tokenizer("a photo of a cat")["input_ids"][:3] == [49406, 320, 1125]
    assert preprocess.image_size == 64
    with pytest.raises(ValueError, match="512-d"):
        build_model("base", str(tmp_path / "clip"))
