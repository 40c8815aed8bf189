"""The triplet loader and the image preprocessing, on real photos and real broken images."""

from __future__ import annotations

import io
import struct
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from magiclens.model.data import (
    MAX_IMAGE_BYTES,
    MAX_IMAGE_PIXELS,
    DatasetError,
    DataPosition,
    TripletBatches,
    consumer_row_groups,
    consumer_rows,
    decode_row,
    plan_row_groups,
    write_triplets,
)
from magiclens.model.preprocess import CLIP_MEAN, CLIP_STD, PreprocessConfig, decode_image, to_model_input
from magiclens.model.tokenizer import bundled_clip_tokenizer

UKBENCH = "images/neardup/imagededup-ukbench/base_images"


@pytest.fixture(scope="module")
def photos(shared_data: Path) -> list[bytes]:
    files = sorted((shared_data / UKBENCH).glob("*.jpg")) + [
        shared_data / "images/photos/skimage/chelsea.png",
        shared_data / "images/photos/matplotlib/grace_hopper.jpg",
    ]
    return [f.read_bytes() for f in files]


def _triplets(photos: list[bytes], count: int, prefix: str = "t") -> list[dict]:
    return [
        {
            "triplet_id": f"{prefix}{i}",
            "query_image": photos[i % len(photos)],
            "instruction": f"instruction number {i}",
            "target_image": photos[(i * 3 + 1) % len(photos)],
        }
        for i in range(count)
    ]


@pytest.fixture(scope="module")
def tokenizer():
    return bundled_clip_tokenizer()


@pytest.fixture
def uneven_dataset(tmp_path: Path, photos: list[bytes]) -> str:
    """Three files, eleven row groups of uneven sizes, 53 rows."""
    rows = _triplets(photos, 53)
    write_triplets(str(tmp_path / "a.parquet"), rows[:20], row_group_size=7)  # 7, 7, 6
    write_triplets(str(tmp_path / "b.parquet"), rows[20:23], row_group_size=1)  # 1, 1, 1
    write_triplets(str(tmp_path / "c.parquet"), rows[23:], row_group_size=6)  # 6, 6, 6, 6, 6
    return str(tmp_path / "*.parquet")


@pytest.mark.parametrize(("world_size", "workers"), [(1, 1), (1, 3), (2, 2), (3, 1), (4, 4)])
def test_one_pass_splits_rows_across_ranks_and_workers_without_overlap_or_gap(uneven_dataset, world_size, workers):
    plan = plan_row_groups(uneven_dataset)
    assert len(plan) == 11 and sum(g.num_rows for g in plan) == 53
    consumers = world_size * workers
    seen = Counter()
    for consumer in range(consumers):
        rows = consumer_rows(plan, consumer, consumers, shuffle=True, seed=5, repeat=False, buffer_size=9)
        seen.update(row["triplet_id"] for row in rows)
    assert seen == Counter(f"t{i}" for i in range(53))


def test_repeated_epochs_deal_each_row_group_once_per_epoch(uneven_dataset):
    plan = plan_row_groups(uneven_dataset)
    consumers, epochs = 6, 4  # more consumers than some epochs' share: small data repeats
    dealt = Counter()
    for consumer in range(consumers):
        groups = consumer_row_groups(plan, consumer, consumers, shuffle=True, seed=1, repeat=True)
        share = len(range(consumer, epochs * len(plan), consumers))
        dealt.update((g.path, g.index) for _, g in zip(range(share), groups))
    assert set(dealt.values()) == {epochs} and len(dealt) == len(plan)


def test_a_stream_restarted_at_a_position_continues_the_same_rows(uneven_dataset):
    plan = plan_row_groups(uneven_dataset)
    kwargs = dict(shuffle=True, seed=3, repeat=True, buffer_size=10)
    full = consumer_rows(plan, 1, 2, **kwargs)
    reference = [next(full)["triplet_id"] for _ in range(80)]  # past the first epoch
    assert len(set(reference[:20])) > 5  # shuffled, not in file order
    for start in (0, 1, 17, 26, 51):
        resumed = consumer_rows(plan, 1, 2, start=start, **kwargs)
        assert [next(resumed)["triplet_id"] for _ in range(80 - start)] == reference[start:]


def _ids(batch) -> list[str]:
    return list(batch["triplet_id"])


def test_resumed_loader_yields_the_batches_an_uninterrupted_one_would(uneven_dataset, tokenizer):
    plan = plan_row_groups(uneven_dataset)

    def loader(resume=None):
        dataset = TripletBatches(plan, tokenizer, 32, 4, num_workers=2, seed=7, buffer_size=8, resume=resume)
        return iter(DataLoader(dataset, batch_size=None, num_workers=2))

    uninterrupted = loader()
    reference = [_ids(next(uninterrupted)) for _ in range(9)]
    assert len({i for ids in reference for i in ids}) > 20
    interrupted = loader()
    position = DataPosition()
    for _ in range(5):  # an odd count: the next batch is worker 1's turn
        position.advance(next(interrupted))
    resumed = loader(DataPosition.from_dict(position.to_dict()))
    assert [_ids(next(resumed)) for _ in range(4)] == reference[5:]


def test_batches_hold_decoded_images_hashes_and_token_ids(uneven_dataset, tokenizer, photos):
    plan = plan_row_groups(uneven_dataset)
    dataset = TripletBatches(plan, tokenizer, 32, 5, num_workers=0, shuffle=False, repeat=False)
    batch = next(iter(dataset))
    assert batch["query_pixels"].shape == batch["target_pixels"].shape == (5, 3, 32, 32)
    assert batch["query_pixels"].dtype == torch.uint8
    assert batch["input_ids"].shape[0] == 5 and batch["input_ids"][0, 0].item() == 49406
    # t0 and t4 share nothing, t0's query is photo 0 and so is t12's (photos repeat every 12 rows)
    assert batch["triplet_id"] == ["t0", "t1", "t2", "t3", "t4"]
    assert len(set(batch["query_hash"].tolist())) == 5
    assert batch["instruction"][3] == "instruction number 3"


def test_small_datasets_repeat_to_fill_the_steps(tmp_path, photos, tokenizer):
    write_triplets(str(tmp_path / "small.parquet"), _triplets(photos, 6))
    plan = plan_row_groups(str(tmp_path / "small.parquet"))
    stream = iter(TripletBatches(plan, tokenizer, 16, 4, num_workers=0, buffer_size=8))
    batches = [next(stream) for _ in range(30)]  # 120 rows from 6
    assert all(len(b["triplet_id"]) == 4 for b in batches)
    counts = Counter(i for b in batches for i in b["triplet_id"])
    assert set(counts) == {f"t{i}" for i in range(6)}
    assert max(counts.values()) - min(counts.values()) <= 8  # the buffer only delays rows


def test_unusable_rows_are_skipped_and_counted_by_reason(tmp_path, shared_data, photos, tokenizer):
    edge = shared_data / "images/edgecases"
    broken = {
        "truncated": (edge / "pillow_truncated_jpeg.jpg").read_bytes(),
        "corrupt": (edge / "imagededup_ukbench09268_corrupt.jpg").read_bytes(),
        "ultrahdr": (edge / "pillow_ultrahdr.jpg").read_bytes(),
    }
    good = _triplets(photos, 4, prefix="good")
    bad = [
        {"triplet_id": "b1", "query_image": broken["truncated"], "instruction": "x", "target_image": photos[0]},
        {"triplet_id": "b2", "query_image": photos[0], "instruction": "x", "target_image": broken["corrupt"]},
        {"triplet_id": "b3", "query_image": photos[1], "instruction": "x", "target_image": broken["ultrahdr"]},
        {"triplet_id": "b4", "query_image": photos[1], "instruction": "   ", "target_image": photos[2]},
        {"triplet_id": "b5", "query_image": photos[1], "instruction": None, "target_image": photos[2]},
        {"triplet_id": "b6", "query_image": b"", "instruction": "x", "target_image": photos[2]},
    ]
    path = tmp_path / "mixed.parquet"
    write_triplets(str(path), good[:2] + bad + good[2:])
    # a null image struct, as other writers may produce
    table = pq.read_table(path)
    images = table.column("target_image").to_pylist()
    images[0] = None
    column = table.schema.get_field_index("target_image")
    table = table.set_column(column, "target_image", pa.array(images, table.schema.field(column).type))
    pq.write_table(table, path)

    dataset = TripletBatches(plan_row_groups(str(path)), tokenizer, 32, 100, num_workers=0, shuffle=False, repeat=False)
    position = DataPosition()
    ids = []
    for batch in dataset:
        position.advance(batch)
        ids += batch["triplet_id"]
    assert ids == ["good1", "good2", "good3"]
    assert position.rejects() == {
        "instruction_missing": 2,
        "query_image_missing": 1,
        "query_image_undecodable": 1,
        "target_image_missing": 1,
        "target_image_undecodable": 2,
    }


def _png_header_claiming(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR declaring width x height, then a few bytes of pixel data."""

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_over_large_images_are_skipped_before_decoding_and_counted(tmp_path, photos, tokenizer):
    # 9000x9000 (81 M pixels, under Pillow's own limit) declared by a 100-byte file: were it
    # decoded, it would be undecodable (no pixel data), so "too large" shows the header decided
    many_pixels = _png_header_claiming(9000, 9000)
    # a real photo padded past the byte cap (a 108 MB PNG took training to 4 GB)
    many_bytes = photos[0] + bytes(MAX_IMAGE_BYTES)
    rows = _triplets(photos, 2, prefix="good") + [
        {"triplet_id": "p", "query_image": many_pixels, "instruction": "x", "target_image": photos[0]},
        {"triplet_id": "b", "query_image": photos[0], "instruction": "x", "target_image": many_bytes},
        {"triplet_id": "h", "query_image": photos[1], "instruction": "x", "target_image": _png_header_claiming(20_000, 20_000)},
    ]
    write_triplets(str(tmp_path / "large.parquet"), rows)
    dataset = TripletBatches(plan_row_groups(str(tmp_path / "large.parquet")), tokenizer, 32, 10, num_workers=0,
                             shuffle=False, repeat=False)
    position = DataPosition()
    ids = []
    for batch in dataset:
        position.advance(batch)
        ids += batch["triplet_id"]
    assert ids == ["good0", "good1"]
    assert position.rejects() == {"query_image_too_large": 1, "target_image_too_large": 2}
    assert MAX_IMAGE_PIXELS < 81_000_000


def test_the_size_limits_of_a_row_can_be_changed(photos):
    image = {"bytes": photos[0], "path": None}
    row = {"triplet_id": "t", "query_image": image, "instruction": "x", "target_image": image}
    assert not isinstance(decode_row(row, 32), str)
    assert decode_row(row, 32, max_image_bytes=len(photos[0]) - 1) == "query_image_too_large"
    with Image.open(io.BytesIO(photos[0])) as photo:
        pixel_count = photo.width * photo.height
    assert not isinstance(decode_row(row, 32, max_image_pixels=pixel_count), str)
    assert decode_row(row, 32, max_image_pixels=pixel_count - 1) == "query_image_too_large"


def test_a_dataset_where_nothing_decodes_is_an_error_not_a_hang(tmp_path, shared_data, tokenizer):
    corrupt = (shared_data / "images/edgecases/imagededup_ukbench09268_corrupt.jpg").read_bytes()
    rows = [{"triplet_id": str(i), "query_image": corrupt, "instruction": "x", "target_image": corrupt} for i in range(3)]
    write_triplets(str(tmp_path / "bad.parquet"), rows)
    dataset = TripletBatches(plan_row_groups(str(tmp_path / "bad.parquet")), tokenizer, 32, 2, num_workers=0)
    with pytest.raises(DatasetError, match="could not be used"):
        next(iter(dataset))


def test_inputs_that_are_not_triplet_datasets_get_clear_errors(tmp_path, photos, shared_data):
    with pytest.raises(DatasetError, match="no file matches"):
        plan_row_groups(str(tmp_path / "nothing*.parquet"))
    pq.write_table(pa.table({"triplet_id": ["a"], "instruction": ["b"]}), tmp_path / "cols.parquet")
    with pytest.raises(DatasetError, match="query_image, target_image"):
        plan_row_groups(str(tmp_path / "cols.parquet"))
    pq.write_table(  # images as file names, not bytes (plain binary columns are read: tests/test_schemas.py)
        pa.table({"triplet_id": ["a"], "query_image": ["a.jpg"], "instruction": ["b"], "target_image": ["b.jpg"]}),
        tmp_path / "names.parquet",
    )
    with pytest.raises(DatasetError, match="struct<bytes"):
        plan_row_groups(str(tmp_path / "names.parquet"))
    with pytest.raises(DatasetError, match="not a readable Parquet file"):
        plan_row_groups(str(shared_data / "images/photos/skimage/coffee.png"))


def test_any_fsspec_filesystem_works(photos, tokenizer):
    """gs:// goes through the same fsspec calls; the in-memory filesystem stands in for it."""
    write_triplets("memory://magiclens-test/part-0.parquet", _triplets(photos, 5), row_group_size=2)
    write_triplets("memory://magiclens-test/part-1.parquet", _triplets(photos, 3, prefix="u"), row_group_size=2)
    plan = plan_row_groups("memory://magiclens-test/*.parquet")
    assert [g.num_rows for g in plan] == [2, 2, 1, 2, 1]
    dataset = TripletBatches(plan, tokenizer, 16, 8, num_workers=0, shuffle=False, repeat=False)
    assert sorted(next(iter(dataset))["triplet_id"]) == sorted([f"t{i}" for i in range(5)] + ["u0", "u1", "u2"])


def _released_preprocessing(path: Path, size: int) -> np.ndarray:
    """The official path in float: divide by the image's maximum, bilinear (antialiased) resize
    straight to size x size, CLIP mean/std."""
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(np.float32)
    pixels = pixels / (pixels.max() + 1e-12)
    channels = [np.asarray(Image.fromarray(pixels[..., c], mode="F").resize((size, size), Image.BILINEAR)) for c in range(3)]
    return (np.stack(channels) - np.array(CLIP_MEAN)[:, None, None]) / np.array(CLIP_STD)[:, None, None]


@pytest.mark.parametrize("name", ["photos/skimage/chelsea.png", "photos/matplotlib/grace_hopper.jpg"])
def test_preprocessing_is_the_released_evaluation_path(shared_data, name):
    path = shared_data / "images" / name
    pixels, max_value = decode_image(path.read_bytes(), 224)
    ours = to_model_input(pixels[None], torch.tensor([max_value]), PreprocessConfig())[0].numpy()
    reference = _released_preprocessing(path, 224)
    # the only difference: resizing in 8-bit fixed point, within a level of 255
    level = 1 / max_value / min(CLIP_STD)
    assert np.abs(ours - reference).max() < 1.5 * level
    assert np.abs(ours - reference).mean() < 0.5 * level
    # not a centre crop: the whole (non-square) image is squashed in
    assert Image.open(path).width != Image.open(path).height


def test_fast_jpeg_decoding_stays_close_to_the_released_path(shared_data):
    path = shared_data / "images/photos/matplotlib/grace_hopper.jpg"  # 512x600: decoded at 1/2 scale
    pixels, max_value = decode_image(path.read_bytes(), 224, fast_jpeg=True)
    ours = to_model_input(pixels[None], torch.tensor([max_value]), PreprocessConfig())[0].numpy()
    assert np.abs(ours - _released_preprocessing(path, 224)).mean() < 0.03


def test_exif_orientation_is_applied(shared_data):
    edge = shared_data / "images/edgecases"
    upright = decode_image((edge / "pillow_hopper.jpg").read_bytes(), 64)[0].float()
    rotated_file = edge / "pillow_hopper_orientation_6.jpg"
    turned = decode_image(rotated_file.read_bytes(), 64)[0].float()
    as_stored = torch.from_numpy(np.array(Image.open(rotated_file).convert("RGB").resize((64, 64)))).permute(2, 0, 1).float()
    assert (turned - upright).abs().mean() < 10
    assert (as_stored - upright).abs().mean() > 40
