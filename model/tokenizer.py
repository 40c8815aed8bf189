"""The text tokenizer: OpenAI CLIP's byte-level BPE, 77 tokens.

`bundled_clip_tokenizer()` builds it offline from the merges file in model/assets/ (see its NOTICE),
deriving the vocabulary exactly as OpenAI's reference tokenizer does, so token ids match the
released CLIP and MagicLens weights. A pretrained backbone brings its own tokenizer instead
(`load_tokenizer(path_or_hub_id)`).

`tokenize` gives the ids the released MagicLens code gives (Scenic's CLIP tokenizer over OpenAI's
SimpleTokenizer, truncate=True): the text is cleaned first as SimpleTokenizer cleans it
(`clean_text`), which the Hugging Face tokenizer alone does not do (it neither unescapes HTML nor
repairs text with ftfy), and rows are padded with id 0. See docs/fidelity.md.
"""

from __future__ import annotations

import gzip
import html
import re
from functools import lru_cache
from pathlib import Path

import ftfy
import torch
from transformers import CLIPTokenizer, PreTrainedTokenizerBase

CONTEXT_LENGTH = 77
BPE_MERGES_FILE = Path(__file__).resolve().parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
PAD_ID = 0  # the released code pads with 0, which is also the id of the BPE symbol "!"
START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
# OpenAI's vocabulary is 512 byte symbols + 48,894 merges + 2 special tokens = 49,408.
_MERGE_COUNT = 49152 - 256 - 2


def _byte_symbols() -> list[str]:
    """The 256 printable symbols that stand for the bytes 0..255, in OpenAI's vocabulary order.

    Bytes that are printable Latin-1 characters stand for themselves and come first; every other
    byte is mapped, in byte order, to the code points from 256 up.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


@lru_cache(maxsize=1)
def _bundled_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    with gzip.open(BPE_MERGES_FILE, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # line 0 is a version header
    merges = [tuple(line.split()) for line in lines[1 : 1 + _MERGE_COUNT]]
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += [START_TOKEN, END_TOKEN]
    return {token: i for i, token in enumerate(tokens)}, merges  # type: ignore[return-value]


def bundled_clip_tokenizer() -> PreTrainedTokenizerBase:
    """OpenAI CLIP's tokenizer, built from the bundled merges file without any download."""
    vocab, merges = _bundled_vocabulary()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=CONTEXT_LENGTH)


def load_tokenizer(source: str | None) -> PreTrainedTokenizerBase:
    """The tokenizer saved with a backbone or checkpoint (a directory or hub id), else the bundled one."""
    if source is None:
        return bundled_clip_tokenizer()
    return CLIPTokenizer.from_pretrained(source)


_WHITESPACE = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """The text as OpenAI's SimpleTokenizer sees it before BPE: repaired by ftfy, HTML entities
    unescaped twice ("&amp;amp;" -> "&"), whitespace runs collapsed to one space, stripped, lower case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return _WHITESPACE.sub(" ", text).strip().lower()


def tokenize(tokenizer: PreTrainedTokenizerBase, texts: list[str], fixed_length: bool = True) -> torch.Tensor:
    """Token ids, as the released code makes them: start token, the cleaned text, end token, then 0s.

    A text longer than 77 tokens is cut to its first 75 and the end token kept last (the released
    tokenizer's truncate=True; its evaluation script, which does not truncate, would raise instead).
    With fixed_length the ids are (len(texts), 77), as the released code feeds them; otherwise
    they are only as long as the longest text, which gives the same embeddings (CLIP's text
    attention is causal and pools at the first end token) for less compute.
    """
    rows = tokenizer([clean_text(text) for text in texts], truncation=True, max_length=CONTEXT_LENGTH)["input_ids"]
    width = CONTEXT_LENGTH if fixed_length else max((len(row) for row in rows), default=0)
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return ids
