"""Streaming triplets from Parquet shards into training batches.

A dataset is any set of Parquet files (a glob, local or any fsspec URL such as gs://) with the
columns `triplet_id`, `query_image`, `instruction` and `target_image` (images as
struct<bytes, path>, or as plain binary as img2dataset writes them); other columns are not read.

How the work is split. The unit of reading is the row group. The infinite sequence "epoch 0's row
groups, then epoch 1's, ..." (each epoch in its own seeded order when shuffling) is dealt round-robin
to the consumers, one consumer per (DDP rank, DataLoader worker): within every stretch of that
sequence each row group goes to exactly one consumer, so there is no overlap and no gap, and a small
dataset simply repeats. Each consumer mixes its rows in a shuffle buffer, decodes the images of the
rows that leave the buffer and yields whole batches. A row that cannot be used (missing,
over-large or undecodable image, missing instruction) is skipped and counted by reason.

Exact resume. What a consumer yields depends only on the row-group sizes, the seed and how many
rows it has taken from its buffer, so the position of a consumer is one number. Resuming replays
the order on indices alone (no reading, no decoding) up to that number, then reads only the row
groups that still have rows in the buffer.
"""

from __future__ import annotations

import hashlib
import io
import random
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from transformers import PreTrainedTokenizerBase

from magiclens.model.preprocess import ImageDecodeError, decode_image
from magiclens.model.tokenizer import tokenize

REQUIRED_COLUMNS = ("triplet_id", "query_image", "instruction", "target_image")
IMAGE_COLUMNS = ("query_image", "target_image")
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
TRIPLET_SCHEMA = pa.schema(
    [("triplet_id", pa.string()), ("query_image", IMAGE_TYPE), ("instruction", pa.string()), ("target_image", IMAGE_TYPE)]
)
# Images over either limit are skipped before decoding (`{side}_image_too_large`): a single
# 108 MB PNG in a dataset took a training worker to 4 GB. Stored triplet images are 512 px JPEGs
# of well under 1 MB; 40 M pixels is 120 MB decoded.
MAX_IMAGE_BYTES = 16_000_000
MAX_IMAGE_PIXELS = 40_000_000


class DatasetError(ValueError):
    """The data given to the trainer cannot be used as a triplet dataset."""


@dataclass(frozen=True)
class RowGroup:
    path: str  # a URL that fsspec opens
    index: int
    num_rows: int


def _check_committed(fs: fsspec.AbstractFileSystem, path: str, pattern: str) -> None:
    """Files in a folder of a magiclens run (or in the run's folder) are read only once that run
    committed: its folder has _SUCCESS. Folders no run wrote are taken as they are."""
    folder = path.split("*")[0].split("?")[0].split("[")[0].rsplit("/", 1)[0] if fsspec.core.has_magic(path) \
        else path.rsplit("/", 1)[0]
    for run_dir in (folder, folder.rsplit("/", 1)[0]):
        run_markers = [f"{run_dir}/_MANIFEST.json", f"{run_dir}/_temporary", *fs.glob(f"{run_dir}/_RUNNING.*")]
        if fs.exists(f"{run_dir}/_SUCCESS"):
            return
        if any(fs.exists(marker) for marker in run_markers):
            raise DatasetError(f"{pattern}: {run_dir}/_SUCCESS is missing, so the run that writes {run_dir} has not "
                               "finished (still running, killed, or failed); train on a finished output")


def expand_glob(pattern: str) -> list[str]:
    """The files that a glob matches, as URLs fsspec can open, sorted; an error if there are none, or
    if they are the output of a magiclens run that did not commit (see pipeline/output.py)."""
    try:
        fs, path = fsspec.core.url_to_fs(pattern)
    except ImportError as error:
        raise DatasetError(f"{pattern}: {error}; for gs:// paths install gcsfs: pip install 'magiclens[gcp]'") from None
    _check_committed(fs, path, pattern)
    matches = sorted(fs.glob(path)) if fsspec.core.has_magic(path) else [path]
    files = [m for m in matches if fs.isfile(m)]
    if not files:
        raise DatasetError(f"no file matches {pattern!r}: give a Parquet file or a glob such as 'dir/*.parquet'")
    return [fs.unstrip_protocol(f) for f in files]


def write_triplets(path: str, triplets: list[dict[str, Any]], row_group_size: int = 1000) -> None:
    """Write triplets (dicts of triplet_id, query_image and target_image as encoded bytes,
    instruction) as a Parquet file with the four required columns."""
    columns = {
        "triplet_id": [t["triplet_id"] for t in triplets],
        "query_image": [{"bytes": t["query_image"], "path": None} for t in triplets],
        "instruction": [t["instruction"] for t in triplets],
        "target_image": [{"bytes": t["target_image"], "path": None} for t in triplets],
    }
    fs, fs_path = fsspec.core.url_to_fs(path)
    with fs.open(fs_path, "wb") as f:
        pq.write_table(pa.table(columns, schema=TRIPLET_SCHEMA), f, row_group_size=row_group_size)


def _check_schema(schema: pa.Schema, path: str) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
    if missing:
        raise DatasetError(
            f"{path} lacks the column(s) {', '.join(missing)}; a triplet dataset needs "
            f"{', '.join(REQUIRED_COLUMNS)} (images as struct<bytes: binary, path: string>)"
        )
    for column in IMAGE_COLUMNS:
        kind = schema.field(column).type
        is_bytes = pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
        if not (is_bytes or (pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0)):
            raise DatasetError(
                f"{path}: column {column} is {kind}, but images must be struct<bytes: binary, path: string> or binary"
            )


def plan_row_groups(pattern: str) -> list[RowGroup]:
    """Every row group of every matching file, after checking each file's schema."""
    plan = []
    for url in expand_glob(pattern):
        fs, path = fsspec.core.url_to_fs(url)
        try:
            with fs.open(path, "rb") as f:
                metadata = pq.ParquetFile(f).metadata
        except (pa.ArrowInvalid, OSError) as error:
            raise DatasetError(f"{url} is not a readable Parquet file: {error}") from error
        _check_schema(metadata.schema.to_arrow_schema(), url)
        plan += [
            RowGroup(url, i, metadata.row_group(i).num_rows)
            for i in range(metadata.num_row_groups)
            if metadata.row_group(i).num_rows > 0
        ]
    if not plan:
        raise DatasetError(f"the files matching {pattern!r} hold no rows")
    return plan


def consumer_row_groups(
    plan: list[RowGroup], consumer: int, num_consumers: int, shuffle: bool, seed: int, repeat: bool
) -> Iterator[RowGroup]:
    """The row groups of one consumer, in order: its share of epoch 0, then of epoch 1, ..."""
    position = 0  # in the sequence of all epochs' row groups
    epoch = 0
    while True:
        order = list(range(len(plan)))
        if shuffle:
            random.Random(f"{seed}/epoch/{epoch}").shuffle(order)
        for unit in order:
            if position % num_consumers == consumer:
                yield plan[unit]
            position += 1
        epoch += 1
        if not repeat:
            return


class ShuffleBuffer:
    """A fixed-size buffer: each new item takes the place of a random one, which leaves."""

    def __init__(self, size: int, rng: random.Random) -> None:
        self.size = size
        self.rng = rng
        self.items: list[Any] = []

    def push(self, item: Any) -> Any | None:
        """Add an item; return the one that leaves, or None while the buffer is filling up."""
        if len(self.items) < self.size:
            self.items.append(item)
            return None
        if self.size == 0:
            return item
        slot = self.rng.randrange(self.size)
        leaving, self.items[slot] = self.items[slot], item
        return leaving

    def drain(self) -> list[Any]:
        self.rng.shuffle(self.items)
        items, self.items = self.items, []
        return items


def _read_rows(group: RowGroup, rows: list[int] | None = None) -> list[dict[str, Any]]:
    fs, path = fsspec.core.url_to_fs(group.path)
    with fs.open(path, "rb") as f:
        table = pq.ParquetFile(f).read_row_group(group.index, columns=list(REQUIRED_COLUMNS))
    if rows is not None:
        table = table.take(rows)
    return table.to_pylist()


def consumer_rows(
    plan: list[RowGroup],
    consumer: int,
    num_consumers: int,
    *,
    shuffle: bool,
    seed: int,
    repeat: bool,
    buffer_size: int,
    start: int = 0,
) -> Iterator[dict[str, Any]]:
    """One consumer's rows in shuffle-buffer order, from its `start`-th row on."""
    groups = consumer_row_groups(plan, consumer, num_consumers, shuffle, seed, repeat)
    slots = ((group, row) for group in groups for row in range(group.num_rows))
    buffer = ShuffleBuffer(buffer_size if shuffle else 0, random.Random(f"{seed}/rows/{consumer}/{num_consumers}"))

    # Replay on (row group, row) slots up to `start`, then read what the buffer holds.
    taken = 0
    while taken < start:
        try:
            slot = next(slots)
        except StopIteration:
            break
        if buffer.push(slot) is not None:
            taken += 1
    if taken < start:  # a finite stream that ended before `start`
        return
    pending: dict[RowGroup, list[int]] = {}
    for group, row in buffer.items:
        pending.setdefault(group, []).append(row)
    loaded = {}
    for group, rows in pending.items():
        loaded.update({(group, row): data for row, data in zip(rows, _read_rows(group, rows))})
    buffer.items = [loaded[slot] for slot in buffer.items]

    current: RowGroup | None = None
    current_rows: list[dict[str, Any]] = []
    for group, row in slots:
        if group is not current:
            current, current_rows = group, _read_rows(group)
        leaving = buffer.push(current_rows[row])
        if leaving is not None:
            yield leaving
    yield from buffer.drain()


def content_hash(data: bytes) -> int:
    """A 64-bit content hash (the first 8 bytes of the SHA-256), as a signed int64."""
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little", signed=True)


@dataclass
class Triplet:
    triplet_id: str
    instruction: str
    query_pixels: torch.Tensor  # (3, S, S) uint8
    query_max: float
    query_hash: int
    target_pixels: torch.Tensor
    target_max: float
    target_hash: int


def _over_large(data: bytes, max_bytes: int, max_pixels: int) -> bool:
    """More encoded bytes than max_bytes, or more pixels than max_pixels in the header (read
    without decoding a pixel); a header Pillow cannot read is left to decode_image to reject."""
    if len(data) > max_bytes:
        return True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
    except Image.DecompressionBombError:
        return True
    except Exception:  # noqa: BLE001 -- untrusted bytes; decode_image reports them as undecodable
        return False
    return width * height > max_pixels


def decode_row(
    row: dict[str, Any],
    image_size: int,
    fast_jpeg: bool = False,
    *,
    max_image_bytes: int = MAX_IMAGE_BYTES,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
) -> Triplet | str:
    """A decoded triplet, or the reason the row cannot be used."""
    instruction = row.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        return "instruction_missing"
    decoded = {}
    for side in ("query", "target"):
        image = row.get(f"{side}_image") or {}
        data = image.get("bytes") if isinstance(image, dict) else image  # struct<bytes, path>, or plain binary
        if not data:
            return f"{side}_image_missing"
        if _over_large(data, max_image_bytes, max_image_pixels):
            return f"{side}_image_too_large"
        try:
            pixels, max_value = decode_image(data, image_size, fast_jpeg)
        except ImageDecodeError:
            return f"{side}_image_undecodable"
        decoded[side] = (pixels, max_value, content_hash(data))
    return Triplet(
        triplet_id=str(row.get("triplet_id")),
        instruction=instruction,
        query_pixels=decoded["query"][0],
        query_max=decoded["query"][1],
        query_hash=decoded["query"][2],
        target_pixels=decoded["target"][0],
        target_max=decoded["target"][1],
        target_hash=decoded["target"][2],
    )


def collate(triplets: list[Triplet], tokenizer: PreTrainedTokenizerBase, fixed_text_length: bool) -> dict[str, Any]:
    return {
        "triplet_id": [t.triplet_id for t in triplets],
        "instruction": [t.instruction for t in triplets],
        "input_ids": tokenize(tokenizer, [t.instruction for t in triplets], fixed_length=fixed_text_length),
        "query_pixels": torch.stack([t.query_pixels for t in triplets]),
        "query_max": torch.tensor([t.query_max for t in triplets], dtype=torch.float32),
        "query_hash": torch.tensor([t.query_hash for t in triplets], dtype=torch.int64),
        "target_pixels": torch.stack([t.target_pixels for t in triplets]),
        "target_max": torch.tensor([t.target_max for t in triplets], dtype=torch.float32),
        "target_hash": torch.tensor([t.target_hash for t in triplets], dtype=torch.int64),
    }


@dataclass
class StreamState:
    """Where one consumer stream stands: rows taken from its buffer, and rows rejected by reason."""

    position: int = 0
    rejects: dict[str, int] = field(default_factory=dict)


@dataclass
class DataPosition:
    """How far one rank has read: batches consumed and the state of each of its streams."""

    batches: int = 0
    streams: dict[int, StreamState] = field(default_factory=dict)

    def advance(self, batch: dict[str, Any]) -> None:
        self.batches += 1
        self.streams[batch["stream"]] = StreamState(batch["position"], dict(batch["rejects"]))

    def rejects(self) -> dict[str, int]:
        return sum_rejects([self])

    def to_dict(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "streams": {str(k): {"position": s.position, "rejects": s.rejects} for k, s in self.streams.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataPosition:
        streams = {int(k): StreamState(v["position"], dict(v["rejects"])) for k, v in data["streams"].items()}
        return cls(batches=int(data["batches"]), streams=streams)


def sum_rejects(positions: Iterable[DataPosition]) -> dict[str, int]:
    """Rejected rows by reason, over every stream of the given positions (e.g. of all ranks)."""
    total: Counter[str] = Counter()
    for position in positions:
        for state in position.streams.values():
            total.update(state.rejects)
    return dict(sorted(total.items()))


class TripletBatches(IterableDataset):
    """Batches of decoded triplets for one rank; use with DataLoader(batch_size=None).

    Token ids are as long as the longest instruction of the batch, or always 77 with
    fixed_text_length (for torch.compile, which prefers fixed shapes). fast_jpeg: see decode_image.
    Each DataLoader worker (or the main process when num_workers is 0) is one stream and yields
    whole batches, each tagged with its stream and that stream's position after it, which
    `DataPosition.advance` records. With `repeat` the batches never end (the trainer counts steps)
    and every batch is full; without it, each row is read once and the last batches may be short.
    """

    def __init__(
        self,
        plan: list[RowGroup],
        tokenizer: PreTrainedTokenizerBase,
        image_size: int,
        batch_size: int,
        *,
        num_workers: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        repeat: bool = True,
        seed: int = 0,
        buffer_size: int = 1000,
        fixed_text_length: bool = False,
        fast_jpeg: bool = False,
        resume: DataPosition | None = None,
    ) -> None:
        self.plan = plan
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_streams = max(num_workers, 1)
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.repeat = repeat
        self.seed = seed
        self.buffer_size = buffer_size
        self.fixed_text_length = fixed_text_length
        self.fast_jpeg = fast_jpeg
        self.resume = resume or DataPosition()
        self.total_rows = sum(group.num_rows for group in plan)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if (info.num_workers if info is not None else 1) != self.num_streams:
            raise RuntimeError("TripletBatches was built for a different number of DataLoader workers")
        # A new DataLoader asks worker 0 first; after n batches the next one is stream n's turn.
        stream = (worker + self.resume.batches) % self.num_streams
        state = self.resume.streams.get(stream, StreamState())
        rejects = Counter(state.rejects)
        position = state.position
        rows = consumer_rows(
            self.plan,
            self.rank * self.num_streams + stream,
            self.world_size * self.num_streams,
            shuffle=self.shuffle,
            seed=self.seed,
            repeat=self.repeat,
            buffer_size=self.buffer_size,
            start=position,
        )
        batch: list[Triplet] = []
        rejected_in_a_row = 0
        for row in rows:
            position += 1
            triplet = decode_row(row, self.image_size, self.fast_jpeg)
            if isinstance(triplet, str):
                rejects[triplet] += 1
                rejected_in_a_row += 1
                if self.repeat and rejected_in_a_row > 2 * self.total_rows:
                    raise DatasetError(
                        f"{rejected_in_a_row} rows in a row could not be used ({dict(rejects)}): "
                        "check that the dataset's images are encoded images and its instructions text"
                    )
                continue
            rejected_in_a_row = 0
            batch.append(triplet)
            if len(batch) == self.batch_size:
                yield self._finish(batch, stream, position, rejects)
                batch = []
        if batch:
            yield self._finish(batch, stream, position, rejects)

    def _finish(self, batch: list[Triplet], stream: int, position: int, rejects: Counter[str]) -> dict[str, Any]:
        collated = collate(batch, self.tokenizer, self.fixed_text_length)
        collated.update(stream=stream, position=position, rejects=dict(rejects))
        return collated
