"""The bundled tokenizer is OpenAI CLIP's: the same ids, offline."""

from __future__ import annotations

import hashlib

from magiclens.model.tokenizer import BPE_MERGES_FILE, bundled_clip_tokenizer, tokenize

START, END = 49406, 49407


def test_bundled_merges_file_is_openai_clips() -> None:
    digest = hashlib.sha256(BPE_MERGES_FILE.read_bytes()).hexdigest()
    assert digest == "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
    assert (BPE_MERGES_FILE.parent / "NOTICE").read_text().count("MIT") >= 2


def test_ids_match_openai_clip() -> None:
    tokenizer = bundled_clip_tokenizer()
    assert len(tokenizer) == 49408
    ids = tokenize(tokenizer, ["a photo of a cat", "a photo of a dog"])
    assert ids.shape == (2, 77)
    # the ids OpenAI's clip.tokenize gives for these captions
    assert ids[0, :7].tolist() == [START, 320, 1125, 539, 320, 2368, END]
    assert ids[1, :7].tolist() == [START, 320, 1125, 539, 320, 1929, END]
    # 256 byte symbols (printable bytes first), the same with an end-of-word mark, then the merges
    assert tokenizer.convert_ids_to_tokens([0, 255, 256, 511, 512]) == ["!", "Ń", "!</w>", "Ń</w>", "in"]


def test_empty_and_long_texts() -> None:
    tokenizer = bundled_clip_tokenizer()
    empty = tokenize(tokenizer, [""])
    assert empty[0, :2].tolist() == [START, END]
    long = tokenize(tokenizer, ["word " * 200])
    assert long.shape == (1, 77)
    assert long[0, 0].item() == START and long[0, -1].item() == END
    short = tokenize(tokenizer, ["one", "a much longer instruction than one"], fixed_length=False)
    assert short.shape[1] == 2 + 6
