"""Captions of the pairs' images, cached by (image sha256, captioner id, caption prompt id).

The cache is a Parquet dataset (`--captions DIR`, by default `captions/` beside the pairs
directory, local or gs://): each run reads the files that exist when it starts, captions only the
images none of them holds for this captioner and caption prompt, and adds what it captioned as new
files. So writing instructions again with a new instruction prompt or writer never captions again.

Beam steps (all keyed by image sha256, so each image is captioned once however many pairs hold it):

  pairs -> (sha256, image) --CoGroupByKey-- cached (sha256, caption) -> cached captions
                                          \\-> missing -> RunInference(captioner) -> new captions -> cache
  pairs + captions -> pairs with query_caption and target_caption
"""

from __future__ import annotations

import datetime
import posixpath
import uuid

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.parquetio import ReadAllFromParquet, WriteToParquet

from magiclens.pipeline.accounting import NAMESPACE, REJECTS_TAG, StageCounters
from magiclens.pipeline.writers import WriterRejected
from magiclens.pipeline.writers.chat import GenerationBackend, GenerationResult, GenerationTask, RejectFailedBatch, TokenCounters
from magiclens.pipeline.writers.prompt import Prompt, caption_request
from magiclens.pipeline.writers.validate import check_caption, parse_answer

STAGE = "captions"
MISSING_TAG = "missing"
SIDES = ("query", "target")

CAPTIONS = pa.schema(
    [
        pa.field("sha256", pa.string()),  # of the original image bytes, as in the pairs' *_sha256
        pa.field("captioner", pa.string()),  # backend:model
        pa.field("prompt_id", pa.string()),  # the caption prompt's name@version
        pa.field("caption", pa.string()),
        pa.field("created", pa.string()),  # UTC, ISO 8601
    ],
    metadata={"magiclens.schema": "captions", "magiclens.schema_version": "1"},
)


def default_captions_dir(pairs: str) -> str | None:
    """captions/ beside a pairs directory (DIR/pairs -> DIR/captions); None when pairs is a glob or a file."""
    if pairs.endswith(".parquet") or any(ch in pairs for ch in "*?["):
        return None
    return posixpath.join(posixpath.dirname(pairs.rstrip("/")), "captions")


def cached_caption_files(captions_dir: str) -> list[str]:
    """The cache files that exist now; files that this run adds are not read by it."""
    matched = FileSystems.match([FileSystems.join(captions_dir, "*.parquet")])[0].metadata_list
    return sorted(m.path for m in matched if m.size_in_bytes > 0)


def pair_images(pair: dict) -> list[tuple[str, bytes]]:
    """(sha256, image bytes) of both sides of a pair."""
    images = []
    for side in SIDES:
        sha256, image = pair.get(f"{side}_sha256"), (pair.get(f"{side}_image") or {}).get("bytes")
        if sha256 and image:
            images.append((sha256, image))
    return images


def image_refs(pair: dict) -> list[tuple[str, tuple[str, str]]]:
    """(sha256, (pair_id, side)) for both sides of a pair: where each image's caption goes."""
    return [(pair[f"{side}_sha256"], (pair["pair_id"], side)) for side in SIDES if pair.get(f"{side}_sha256")]


class SplitCachedAndMissing(beam.DoFn):
    """Per image: its cached caption, or a captioning task when the cache has none."""

    def __init__(self, prompt: Prompt, seed: int):
        self.prompt = prompt
        self.seed = seed

    def setup(self):
        self.counters = StageCounters(STAGE)
        self.from_cache = beam.metrics.Metrics.counter(NAMESPACE, f"{STAGE}.from_cache")

    def process(self, element):
        sha256, grouped = element
        images, cached = list(grouped["images"]), list(grouped["cached"])
        if not images:  # cached, but not an image of these pairs
            return
        if cached:
            self.from_cache.inc()
            yield sha256, cached[0]
            return
        self.counters.received()
        request = caption_request(self.prompt, images[0], sha256, self.seed)
        yield beam.pvalue.TaggedOutput(MISSING_TAG, GenerationTask(key=sha256, request=request, payload=sha256))


class CaptionsFromGenerations(beam.DoFn):
    """(sha256, caption) for each usable answer; a counted reject with the raw output otherwise."""

    def __init__(self, prompt: Prompt):
        self.prompt = prompt

    def setup(self):
        self.counters = StageCounters(STAGE)
        self.tokens = TokenCounters("captioner")

    def process(self, result: GenerationResult):
        task, generation = result.example, result.inference
        self.tokens.add(result)
        if generation.text is None:
            yield self.counters.reject(task.key, generation.failure, generation.detail)
            return
        try:
            answer = parse_answer(generation.text, self.prompt.output_schema)
            caption = check_caption(answer, self.prompt.min_words, self.prompt.max_words)
        except WriterRejected as rejected:
            yield self.counters.reject(task.key, rejected.reason, rejected.detail)
            return
        self.counters.kept()
        yield task.key, caption


def cache_row(sha256_caption: tuple[str, str], captioner_id: str, prompt_id: str, created: str) -> dict:
    sha256, caption = sha256_caption
    return {"sha256": sha256, "captioner": captioner_id, "prompt_id": prompt_id, "caption": caption, "created": created}


class CaptionImages(beam.PTransform):
    """pairs -> {"captions": (sha256, caption) for every image that has one, REJECTS_TAG: images that got none}."""

    def __init__(self, captions_dir: str, captioner: GenerationBackend, prompt: Prompt, batch_size: int, seed: int):
        super().__init__()
        self.captions_dir = captions_dir
        self.captioner = captioner
        self.prompt = prompt
        self.batch_size = batch_size
        self.seed = seed

    def expand(self, pairs):
        captioner_id, prompt_id = self.captioner.backend_id, self.prompt.prompt_id
        images = pairs | "Images" >> beam.FlatMap(pair_images)
        files = cached_caption_files(self.captions_dir)
        cached = (
            pairs.pipeline
            | "CacheFiles" >> beam.Create(files)
            | "ReadCache" >> ReadAllFromParquet(columns=["sha256", "captioner", "prompt_id", "caption"])
            | "ThisCaptioner" >> beam.Filter(lambda row: row["captioner"] == captioner_id and row["prompt_id"] == prompt_id)
            | "CachedBySha" >> beam.Map(lambda row: (row["sha256"], row["caption"]))
        )
        split = (
            {"images": images, "cached": cached}
            | "GroupByImage" >> beam.CoGroupByKey()
            | "CachedOrMissing" >> beam.ParDo(SplitCachedAndMissing(self.prompt, self.seed)).with_outputs(MISSING_TAG, main="cached")
        )
        # Captioners are models; RunInference (it imports torch) loads only when one is asked for.
        from apache_beam.ml.inference.base import RunInference

        from magiclens.pipeline.writers.inference import GenerationModelHandler

        handler = GenerationModelHandler(self.captioner, self.batch_size, "magiclens_captioner")
        generated, dead_letters = split[MISSING_TAG] | "Caption" >> RunInference(handler).with_exception_handling()
        new = generated | "CheckCaptions" >> beam.ParDo(CaptionsFromGenerations(self.prompt)).with_outputs(REJECTS_TAG, main="captions")
        created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        run_file = f"captions-{created.replace(':', '').replace('+0000', 'Z')}-{uuid.uuid4().hex[:8]}"
        (
            new.captions
            | "CacheRows" >> beam.Map(cache_row, captioner_id, prompt_id, created)
            | "WriteCache" >> WriteToParquet(FileSystems.join(self.captions_dir, run_file), CAPTIONS, file_name_suffix=".parquet")
        )
        failed = dead_letters.failed_inferences | "FailedBatches" >> beam.ParDo(RejectFailedBatch(STAGE))
        captions = (split.cached, new.captions) | "AllCaptions" >> beam.Flatten()
        rejects = (new[REJECTS_TAG], failed) | "CaptionRejects" >> beam.Flatten()
        return {"captions": captions, REJECTS_TAG: rejects}


def _captions_by_pair(element):
    _sha256, grouped = element
    captions = list(grouped["captions"])
    if not captions:
        return
    for pair_id, side in grouped["refs"]:
        yield pair_id, (side, captions[0])


def _with_captions(element):
    _pair_id, grouped = element
    captions = dict(grouped["captions"])
    for pair in grouped["pair"]:
        yield {**pair, **{f"{side}_caption": captions.get(side) for side in SIDES}}


class AttachCaptions(beam.PTransform):
    """pairs -> the same pairs with `query_caption` and `target_caption` (None where an image has none)."""

    def __init__(self, captions):
        super().__init__()
        self.captions = captions

    def expand(self, pairs):
        refs = pairs | "ImageRefs" >> beam.FlatMap(image_refs)
        by_pair = (
            {"refs": refs, "captions": self.captions}
            | "CaptionsByImage" >> beam.CoGroupByKey()
            | "CaptionsByPair" >> beam.FlatMap(_captions_by_pair)
        )
        keyed = pairs | "PairById" >> beam.Map(lambda pair: (pair["pair_id"], pair))
        return {"pair": keyed, "captions": by_pair} | "JoinPairs" >> beam.CoGroupByKey() | "WithCaptions" >> beam.FlatMap(_with_captions)
