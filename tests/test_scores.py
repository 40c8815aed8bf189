"""CLIP scores and the NSFW hook through RunInference, with tiny random models built from configs.

No download: the models are made here with random weights and saved to a temporary folder, which
is then loaded by path exactly as a real model would be. The images are real shared photos.
"""

from __future__ import annotations

from pathlib import Path

import apache_beam as beam
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from beam_run import run_collect  # noqa: E402
from magiclens.pipeline.accounting import REJECTS_TAG  # noqa: E402
from magiclens.pipeline.mine import FilterConfig  # noqa: E402
from magiclens.pipeline.images import normalize_image  # noqa: E402
from magiclens.pipeline.pairs import PageImage, PageInfo, PairingConfig, choose_pairs, pair_row  # noqa: E402
from magiclens.pipeline.records import ImageRef  # noqa: E402
from magiclens.pipeline.scores import (  # noqa: E402
    ClipModel,
    DropNsfwPairs,
    ModelFilters,
    NsfwModel,
    ScoreBands,
    score_problem,
)

PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png"]
ALTS = ["An astronaut in a white suit", "", "A cup of coffee on a saucer", "A rocket on the launch pad", ""]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from magiclens.model.tokenizer import bundled_clip_tokenizer

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, projection_dim=16,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, projection_dim=16),
        projection_dim=16,
    )
    folder = tmp_path_factory.mktemp("tiny-clip")
    CLIPModel(config).save_pretrained(folder)
    bundled_clip_tokenizer().save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_nsfw(tmp_path_factory) -> str:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(1)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_labels=2, id2label={0: "normal", 1: "nsfw"},
                       label2id={"normal": 0, "nsfw": 1})
    folder = tmp_path_factory.mktemp("tiny-nsfw")
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def pair_rows(shared_data) -> list[dict]:
    page = PageInfo(url="https://example.org/gallery", title="Gallery", lang="en", crawl="test")
    images = []
    for position, (name, alt) in enumerate(zip(PHOTOS, ALTS)):
        image = normalize_image((shared_data / "images/photos/skimage" / name).read_bytes())
        ref = ImageRef(url=f"https://example.org/{name}", alt=alt, title="", context="", width=None, height=None,
                       position=position, source="src")
        images.append(PageImage(page, ref, image))
    return [pair_row(q, t) for q, t in choose_pairs(images, PairingConfig(pairs_per_page=10))]


def test_clip_scores_are_cosines_null_without_text_and_independent_of_the_batch(tiny_clip, pair_rows):
    model = ClipModel(tiny_clip)
    scores = model.score_pairs(pair_rows)
    assert len(scores) == len(pair_rows) == 10
    for row, score in zip(pair_rows, scores):
        for side in ("query", "target"):
            value = score[f"{side}_text"]
            assert (value is None) == (not row[f"{side}_alt"])
            assert value is None or -1 <= value <= 1
        assert -1 <= score["pair_similarity"] <= 1
    one_by_one = [model.score_pairs([row])[0] for row in pair_rows[:3]]
    for alone, batched in zip(one_by_one, scores[:3]):
        assert alone["pair_similarity"] == pytest.approx(batched["pair_similarity"], abs=1e-5)
    same = dict(pair_rows[0], target_image=pair_rows[0]["query_image"])
    assert model.score_pairs([same])[0]["pair_similarity"] == pytest.approx(1.0, abs=1e-5)


def test_clip_scores_match_transformers_clip_features_computed_directly(tiny_clip, pair_rows):
    """The same tiny model, images and texts through CLIPModel.get_image_features / get_text_features by
    hand: the scores must be the cosines of those features."""
    import io

    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(tiny_clip).eval()
    tokenizer = CLIPTokenizer.from_pretrained(tiny_clip)
    processor = CLIPImageProcessor.from_pretrained(tiny_clip)

    def projected(output) -> torch.Tensor:
        return output if isinstance(output, torch.Tensor) else output.pooler_output  # transformers 4 | 5

    def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a @ b) / (a.norm() * b.norm()))

    expected = []
    with torch.no_grad():
        for row in pair_rows:
            images = [Image.open(io.BytesIO(row[f"{side}_image"]["bytes"])).convert("RGB") for side in ("query", "target")]
            pixels = processor(images=images, return_tensors="pt")["pixel_values"]
            query, target = projected(model.get_image_features(pixel_values=pixels))
            scores = {"pair_similarity": cosine(query, target)}
            for side, image_features in (("query", query), ("target", target)):
                text = row[f"{side}_alt"] or row[f"{side}_context"]
                if not text:
                    scores[f"{side}_text"] = None
                    continue
                tokens = tokenizer([text], return_tensors="pt")
                text_features = projected(model.get_text_features(**tokens))[0]
                scores[f"{side}_text"] = cosine(image_features, text_features)
            expected.append(scores)
    measured = ClipModel(tiny_clip).score_pairs(pair_rows)
    assert any(score["query_text"] is not None for score in expected)
    for ours, direct in zip(measured, expected):
        assert ours.keys() == direct.keys()
        for name, value in direct.items():
            assert (ours[name] is None) == (value is None), name
            if value is not None:
                assert ours[name] == pytest.approx(value, abs=1e-5), name


def test_bands_decide_which_pairs_are_dropped_and_why():
    bands = ScoreBands(min_text_score=0.2, pair_similarity=(0.5, 0.9))
    assert score_problem({"query_text": None, "target_text": 0.25, "pair_similarity": 0.7}, bands) is None
    assert score_problem({"query_text": 0.1, "target_text": 0.25, "pair_similarity": 0.7}, bands)[0] == "low_text_score"
    assert score_problem({"query_text": None, "target_text": None, "pair_similarity": 0.4}, bands)[0] == "pair_similarity_low"
    assert score_problem({"query_text": None, "target_text": None, "pair_similarity": 0.95}, bands)[0] == "pair_similarity_high"


def midpoint_threshold(values: list[float], rank: int) -> float:
    """A threshold halfway between two neighbouring measured values, far from any float noise."""
    ordered = sorted(set(values))
    return (ordered[rank - 1] + ordered[rank]) / 2


def test_scores_are_written_and_the_bands_filter_in_beam(tiny_clip, pair_rows, tmp_path):
    expected = ClipModel(tiny_clip).score_pairs(pair_rows)
    similarities = [score["pair_similarity"] for score in expected]
    low, high = midpoint_threshold(similarities, 2), midpoint_threshold(similarities, len(similarities) - 1)
    text_scores = [v for s in expected for v in (s["query_text"], s["target_text"]) if v is not None]
    min_text = midpoint_threshold(text_scores, 2)
    config = FilterConfig(clip_model=tiny_clip, pair_similarity=(low, high), min_text_score=min_text,
                          score_batch_size=4)
    collected, stats = run_collect(
        lambda p: (lambda out: {"pairs": out["pairs"], "rejects": out["rejects"]})(
            p | beam.Create(pair_rows) | ModelFilters(config)),
        tmp_path,
    )
    by_id = {row["pair_id"]: score for row, score in zip(pair_rows, expected)}
    should_keep = {
        pair_id for pair_id, s in by_id.items()
        if low <= s["pair_similarity"] <= high
        and all(v is None or v >= min_text for v in (s["query_text"], s["target_text"]))
    }
    assert {row["pair_id"] for row in collected["pairs"]} == should_keep
    assert 0 < len(should_keep) < len(pair_rows)
    for row in collected["pairs"]:
        for name, value in row["scores"].items():
            if by_id[row["pair_id"]][name] is None:
                assert value is None
            else:
                assert value == pytest.approx(by_id[row["pair_id"]][name], abs=1e-5)
    reasons = {reject.reason for reject in collected["rejects"]}
    assert reasons and reasons <= {"pair_similarity_low", "pair_similarity_high", "low_text_score"}
    assert stats["scores"]["in"] == len(pair_rows) and stats["scores"]["balanced"]


def test_nsfw_hook_drops_pairs_with_an_image_at_or_over_the_threshold(tiny_nsfw, pair_rows, shared_data, tmp_path):
    from magiclens.pipeline.scores import _decode

    model = NsfwModel(tiny_nsfw)
    highest = {
        row["pair_id"]: max(model.nsfw_probability([_decode(row["query_image"]["bytes"]), _decode(row["target_image"]["bytes"])]))
        for row in pair_rows
    }
    threshold = midpoint_threshold(list(highest.values()), len(set(highest.values())) // 2)
    collected, stats = run_collect(
        lambda p: (lambda out: {"pairs": out["pairs"], "rejects": out[REJECTS_TAG]})(
            p | beam.Create(pair_rows) | DropNsfwPairs(tiny_nsfw, threshold, batch_size=3)),
        tmp_path,
    )
    assert {row["pair_id"] for row in collected["pairs"]} == {i for i, v in highest.items() if v < threshold}
    assert all(reject.reason == "nsfw" for reject in collected["rejects"]) and collected["rejects"]
    assert stats["nsfw"]["balanced"]


def test_an_nsfw_model_without_an_nsfw_label_is_refused_with_a_clear_error(tiny_clip, tmp_path):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_labels=2, id2label={0: "cat", 1: "dog"}, label2id={"cat": 0, "dog": 1})
    ViTForImageClassification(config).save_pretrained(tmp_path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no 'nsfw' label"):
        NsfwModel(str(tmp_path))


def test_magiclens_mine_with_a_tiny_local_clip_writes_scores_and_the_band_filters(tiny_clip, shared_data, tmp_path):
    import json

    import pyarrow.parquet as pq

    from magiclens.cli import main
    from warcs import write_warc

    site = "http://photos.test/"
    records = [(f"{site}{name}", "image/jpeg", (shared_data / "images/photos/skimage" / name).read_bytes())
               for name in PHOTOS]
    tags = "".join(f'<img src="{site}{name}" alt="{alt}">' for name, alt in zip(PHOTOS, ALTS))
    records.append((f"{site}gallery", "text/html", f"<html><body>{tags}</body></html>".encode()))
    warc = write_warc(tmp_path / "gallery.warc.gz", records)

    def mine(output: Path, *extra: str) -> tuple[list[dict], dict]:
        argv = ["mine", "--input", str(warc), "--output", str(output), "--no-fetch", "--pairs-per-page", "10",
                "--clip-model", tiny_clip, *extra]
        assert main(argv) == 0
        rows = pq.ParquetDataset([str(f) for f in sorted((output / "pairs").glob("*.parquet"))]).read().to_pylist()
        return rows, json.loads((output / "stats.json").read_text())["stages"]

    scored, _ = mine(tmp_path / "all")
    assert len(scored) >= 4
    assert all(row["scores"]["pair_similarity"] is not None for row in scored)
    similarities = [row["scores"]["pair_similarity"] for row in scored]
    low = midpoint_threshold(similarities, 2)
    kept, stats = mine(tmp_path / "band", "--pair-similarity", f"{low},1")
    assert {row["pair_id"] for row in kept} == {
        row["pair_id"] for row in scored if row["scores"]["pair_similarity"] >= low}
    assert stats["scores"]["rejected"]["pair_similarity_low"] == len(scored) - len(kept) > 0
