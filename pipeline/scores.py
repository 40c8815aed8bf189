"""Optional model scores on pair rows, through Beam's RunInference.

With `--clip-model PATH_OR_ID` every pair gets, in its `scores` struct (cosines of L2-normalised
CLIP embeddings, in [-1, 1]):

  query_text       the query image against its own text (alt, else context)
  target_text      the target image against its own text
  pair_similarity  the query image against the target image

A side without text gets a null text score. `--min-text-score` drops pairs where a side with text
scores under it; `--pair-similarity MIN,MAX` keeps pairs whose images are related (over MIN) but
not copies (under MAX). Stage `scores`: reasons low_text_score, pair_similarity_low,
pair_similarity_high.

With `--nsfw-model PATH_OR_ID` (off by default), a transformers image classifier with an "nsfw"
label scores both images; a pair where either reaches `--nsfw-threshold` is dropped (stage `nsfw`,
reason nsfw).

Models are loaded once per worker process by RunInference (`load_model`) and run on batches of
pairs; on a GPU worker (CUDA present) one copy is shared by all the processes of the machine
(`share_model_across_processes`, Beam's large_model). Images are embedded per pair, so an image in
two pairs is embedded twice: simpler than a join by image hash, and pairs per image are capped.

torch and transformers are imported only when a model is loaded, so `magiclens mine` without
these options never imports them.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
from apache_beam.ml.inference.base import ModelHandler, RunInference
from PIL import Image

from magiclens.pipeline.accounting import REJECTS_TAG, CheckStage, Problem

SIDES = ("query", "target")


@dataclass(frozen=True)
class ScoreBands:
    min_text_score: float | None = None
    pair_similarity: tuple[float, float] | None = None


def side_text(row: dict, side: str) -> str:
    """The text an image is scored against: its alt, else its nearby text."""
    for column in (f"{side}_alt", f"{side}_context"):
        text = (row.get(column) or "").strip()
        if text:
            return text
    return ""


def score_problem(scores: dict, bands: ScoreBands) -> tuple[str, str] | None:
    """(reason, detail) when a pair's scores fall outside the bands, else None."""
    if bands.min_text_score is not None:
        for side in SIDES:
            value = scores.get(f"{side}_text")
            if value is not None and value < bands.min_text_score:
                return "low_text_score", f"{side} image against its text: {value:.3f} < {bands.min_text_score:g}"
    if bands.pair_similarity is not None:
        low, high = bands.pair_similarity
        value = scores["pair_similarity"]
        if value < low:
            return "pair_similarity_low", f"{value:.3f} < {low:g}"
        if value > high:
            return "pair_similarity_high", f"{value:.3f} > {high:g}"
    return None


def _decode(jpeg: bytes) -> Image.Image:
    with Image.open(io.BytesIO(jpeg)) as image:
        return image.convert("RGB")


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


class ClipModel:
    """A transformers CLIP with its tokenizer and image processor, on one device."""

    def __init__(self, source: str):
        import torch
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        self.torch = torch
        self.device = _device()
        self.model = CLIPModel.from_pretrained(source).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(source)  # the scoring model's own tokenizer
        self.processor = AutoImageProcessor.from_pretrained(source)

    def _features(self, output):
        # transformers 4 returns the projected embeddings; 5 returns them as `pooler_output`
        features = output if isinstance(output, self.torch.Tensor) else output.pooler_output
        return self.torch.nn.functional.normalize(features.float(), dim=-1)

    def embed_images(self, images: list[Image.Image]):
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        with self.torch.inference_mode():
            return self._features(self.model.get_image_features(pixel_values=pixels))

    def embed_texts(self, texts: list[str]):
        encoded = self.tokenizer(texts, padding=True, truncation=True,
                                 max_length=self.model.config.text_config.max_position_embeddings,
                                 return_tensors="pt").to(self.device)
        with self.torch.inference_mode():
            return self._features(self.model.get_text_features(
                input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]))

    def score_pairs(self, rows: Sequence[dict]) -> list[dict]:
        """The `scores` struct of each pair row."""
        images = [_decode(row[f"{side}_image"]["bytes"]) for row in rows for side in SIDES]
        image_embeddings = self.embed_images(images).view(len(rows), 2, -1)
        texts = [(n, side, side_text(row, side)) for n, row in enumerate(rows) for side in SIDES]
        texts = [item for item in texts if item[2]]
        text_scores: dict[tuple[int, str], float] = {}
        if texts:
            text_embeddings = self.embed_texts([text for _, _, text in texts])
            for (n, side, _), text_embedding in zip(texts, text_embeddings):
                image_embedding = image_embeddings[n, SIDES.index(side)]
                text_scores[(n, side)] = float(image_embedding @ text_embedding)
        similarities = (image_embeddings[:, 0] * image_embeddings[:, 1]).sum(dim=-1).tolist()
        return [
            {
                "query_text": text_scores.get((n, "query")),
                "target_text": text_scores.get((n, "target")),
                "pair_similarity": similarities[n],
            }
            for n in range(len(rows))
        ]


class ClipPairScorer(ModelHandler[dict, dict, ClipModel]):
    """RunInference handler: pair rows in, the same rows with `scores` filled out."""

    def __init__(self, source: str, batch_size: int = 32):
        super().__init__()
        self.source = source
        self.batch_size = batch_size

    def load_model(self) -> ClipModel:
        return ClipModel(self.source)

    def run_inference(self, batch: Sequence[dict], model: ClipModel,
                      inference_args: dict[str, Any] | None = None) -> Iterable[dict]:
        return [{**row, "scores": scores} for row, scores in zip(batch, model.score_pairs(batch))]

    def batch_elements_kwargs(self) -> dict[str, int]:
        return {"min_batch_size": 1, "max_batch_size": self.batch_size}

    def share_model_across_processes(self) -> bool:
        return _on_gpu()

    def get_metrics_namespace(self) -> str:
        return "magiclens_clip"


class NsfwModel:
    """A transformers image classifier; `nsfw_probability` reads the label named `label`."""

    def __init__(self, source: str, label: str = "nsfw"):
        import torch
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        self.torch = torch
        self.device = _device()
        self.model = AutoModelForImageClassification.from_pretrained(source).to(self.device).eval()
        self.processor = AutoImageProcessor.from_pretrained(source)
        labels = {name.lower(): index for index, name in self.model.config.id2label.items()}
        if label not in labels:
            raise ValueError(
                f"the NSFW model {source!r} has no {label!r} label (its labels: {', '.join(sorted(labels))}); "
                "use an image classifier trained with an 'nsfw' class"
            )
        self.label_index = labels[label]

    def nsfw_probability(self, images: list[Image.Image]) -> list[float]:
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        with self.torch.inference_mode():
            logits = self.model(pixel_values=pixels).logits.float()
        return logits.softmax(dim=-1)[:, self.label_index].tolist()


class NsfwPairScorer(ModelHandler[dict, tuple, NsfwModel]):
    """RunInference handler: pair row -> (row, highest nsfw probability of its two images)."""

    def __init__(self, source: str, batch_size: int = 32):
        super().__init__()
        self.source = source
        self.batch_size = batch_size

    def load_model(self) -> NsfwModel:
        return NsfwModel(self.source)

    def run_inference(self, batch: Sequence[dict], model: NsfwModel,
                      inference_args: dict[str, Any] | None = None) -> Iterable[tuple]:
        images = [_decode(row[f"{side}_image"]["bytes"]) for row in batch for side in SIDES]
        probabilities = model.nsfw_probability(images)
        return [(row, max(probabilities[2 * n], probabilities[2 * n + 1])) for n, row in enumerate(batch)]

    def batch_elements_kwargs(self) -> dict[str, int]:
        return {"min_batch_size": 1, "max_batch_size": self.batch_size}

    def share_model_across_processes(self) -> bool:
        return _on_gpu()

    def get_metrics_namespace(self) -> str:
        return "magiclens_nsfw"


class _FilterByScores(CheckStage):
    stage = "scores"

    def __init__(self, bands: ScoreBands):
        self.bands = bands

    def problem(self, row: dict) -> Problem:
        return score_problem(row["scores"], self.bands)

    def element_id(self, row: dict) -> str:
        return row["pair_id"]


class _FilterNsfw(CheckStage):
    stage = "nsfw"

    def __init__(self, threshold: float):
        self.threshold = threshold

    def problem(self, element) -> Problem:
        probability = element[1]
        if probability >= self.threshold:
            return "nsfw", f"probability {probability:.3f} >= {self.threshold:g}"
        return None

    def element_id(self, element) -> str:
        return element[0]["pair_id"]

    def output(self, element) -> dict:
        return element[0]


class ScorePairs(beam.PTransform):
    """Pair rows -> rows with CLIP `scores`, filtered by the bands ({"pairs", REJECTS_TAG})."""

    def __init__(self, clip_model: str, bands: ScoreBands, batch_size: int = 32):
        super().__init__()
        self.handler = ClipPairScorer(clip_model, batch_size)
        self.bands = bands

    def expand(self, rows):
        checked = (
            rows
            | "Clip" >> RunInference(self.handler)
            | "Bands" >> beam.ParDo(_FilterByScores(self.bands)).with_outputs(REJECTS_TAG, main="pairs")
        )
        return {"pairs": checked.pairs, REJECTS_TAG: checked[REJECTS_TAG]}


class DropNsfwPairs(beam.PTransform):
    """Pair rows -> the rows whose two images both score under the threshold ({"pairs", REJECTS_TAG})."""

    def __init__(self, nsfw_model: str, threshold: float, batch_size: int = 32):
        super().__init__()
        self.handler = NsfwPairScorer(nsfw_model, batch_size)
        self.threshold = threshold

    def expand(self, rows):
        checked = (
            rows
            | "Nsfw" >> RunInference(self.handler)
            | "Threshold" >> beam.ParDo(_FilterNsfw(self.threshold)).with_outputs(REJECTS_TAG, main="pairs")
        )
        return {"pairs": checked.pairs, REJECTS_TAG: checked[REJECTS_TAG]}


class ModelFilters(beam.PTransform):
    """Pair rows -> {"pairs", "rejects"}: the NSFW filter, then CLIP scores, each only when configured.

    `config` is a pipeline.filters.FilterConfig. With neither model the rows pass unchanged.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config

    def expand(self, rows):
        config = self.config
        rejects = []
        if config.nsfw_model:
            screened = rows | "DropNsfw" >> DropNsfwPairs(config.nsfw_model, config.nsfw_threshold, config.score_batch_size)
            rows = screened["pairs"]
            rejects.append(screened[REJECTS_TAG])
        if config.clip_model:
            bands = ScoreBands(config.min_text_score, config.pair_similarity)
            scored = rows | "ScorePairs" >> ScorePairs(config.clip_model, bands, config.score_batch_size)
            rows = scored["pairs"]
            rejects.append(scored[REJECTS_TAG])
        if not rejects:
            rejects.append(rows.pipeline | "NoModelRejects" >> beam.Create([]))
        return {"pairs": rows, REJECTS_TAG: rejects | "ModelRejects" >> beam.Flatten()}
