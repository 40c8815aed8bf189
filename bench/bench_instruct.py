"""Tokens per triplet for the shipped prompts, on the web text of the 70 real pages in ../shared/data/html.

Pairs are built as mining builds them, from the text side: the mining extractor (pipeline/extract/)
pulls each page's image references (alt text, figcaption or nearby text, capped as `mine` caps
them) and consecutive references of a page make pairs, at most PAIRS_PER_PAGE per page. The
default prompts are rendered for each pair exactly as the pipeline renders them, and tokens are
counted offline with OpenAI CLIP's byte-level BPE (model/tokenizer.py; a 49k-token vocabulary, so
counts run somewhat above those of the 128k-152k vocabularies of Llama 3 or Qwen 2). What no model
here can produce is estimated, and said so:

- captions fed to the instruction prompt, and model answers: the prompts' own few-shot answers,
  which show the model the length to write;
- image tokens of the captioner: Qwen2-VL's count, one token per 28 x 28 pixels, measured on the
  real photos of ../shared/data/images/photos resized to the mined size (512 px on the long side);
- the chat template: CHAT_TEMPLATE_TOKENS per message plus the same again to open the answer.

Rows (baseline measured in the same run on the same pairs):
- instruct prompt tokens per triplet, N = 1 and 3 instructions per pair, against the tokens of the
  web text the prompt carries (alt, nearby text, title): the ratio is the prompt's overhead;
- instruct answer tokens per triplet against the instruction words alone (the JSON overhead);
- captioner tokens per triplet with the cache (each distinct image once) against captioning both
  images of every pair;
- prompt rendering requests/s against a bare Jinja render of the same templates.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from magiclens.pipeline.writers.prompt import CAPTION, INSTRUCTION, Prompt, caption_request, compiled_template, instruction_request, load_prompt

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
HTML = SHARED / "html"
PHOTOS = SHARED / "images" / "photos"
PAIRS_PER_PAGE = 4  # as `magiclens mine --pairs-per-page` by default
MINED_MAX_SIDE = 512  # as `magiclens mine --max-side` by default
CHAT_TEMPLATE_TOKENS = 4
PIXELS_PER_IMAGE_TOKEN = 28  # Qwen2-VL: 14 px patches, merged 2 x 2
RENDER_ROUNDS = 3


def token_counter() -> tuple[str, Callable[[str], int]]:
    """CLIP's BPE, built offline from the merges file that ships in model/assets/."""
    from magiclens.model.tokenizer import bundled_clip_tokenizer

    tokenizer = bundled_clip_tokenizer()
    tokenizer.model_max_length = 1 << 30  # count, never cut
    return "clip_bpe", lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def page_pairs() -> list[dict]:
    """Pairs of consecutive image references of each real page, with their web text."""
    from magiclens.pipeline.extract import extract_images

    urls = dict(line.split("\t")[-2:] for line in (HTML / "INDEX.tsv").read_text().splitlines()[1:])
    pairs = []
    for path in sorted(HTML.glob("*/*.html.gz")):
        name = f"{path.parent.name}/{path.name}"
        found = extract_images(gzip.decompress(path.read_bytes()), urls.get(name) or f"https://{path.stem}.example/")
        refs = [ref for ref in found.refs if ref.alt or ref.context]
        for query, target in list(zip(refs, refs[1:]))[:PAIRS_PER_PAGE]:
            pair = {"pair_id": f"{name} {query.url} {target.url}", "page_title": found.title}
            for side, ref in (("query", query), ("target", target)):
                pair.update({f"{side}_alt": ref.alt, f"{side}_context": ref.context, f"{side}_sha256": ref.url})
            pairs.append(pair)
    if not pairs:
        raise SystemExit(f"no image references found in {HTML}: clone the project beside ../shared")
    return pairs


def image_tokens_per_photo() -> float:
    """Mean Qwen2-VL image tokens of the real photos, resized as mining resizes them."""
    counts = []
    for path in sorted(PHOTOS.rglob("*")):
        if path.suffix.lower() in (".png", ".jpg", ".jpeg"):
            with Image.open(path) as image:
                width, height = image.size
            scale = min(1.0, MINED_MAX_SIDE / max(width, height))
            counts.append(math.ceil(width * scale / PIXELS_PER_IMAGE_TOKEN) * math.ceil(height * scale / PIXELS_PER_IMAGE_TOKEN))
    return statistics.mean(counts)


def _pick(options: list, key: str) -> object:
    return options[int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % len(options)]


def with_example_captions(pair: dict, captions: list[str]) -> dict:
    return {**pair, "query_caption": _pick(captions, pair["query_sha256"]), "target_caption": _pick(captions, pair["target_sha256"])}


def request_tokens(request, count_tokens: Callable[[str], int]) -> int:
    return sum(count_tokens(m.text) + CHAT_TEMPLATE_TOKENS for m in request.messages) + CHAT_TEMPLATE_TOKENS


def web_text_tokens(pair: dict, count_tokens: Callable[[str], int]) -> int:
    fields = ("page_title", "query_alt", "query_context", "target_alt", "target_context")
    return sum(count_tokens(pair.get(f) or "") for f in fields)


def answer_tokens(prompt: Prompt, count: int, count_tokens: Callable[[str], int]) -> tuple[float, float]:
    """Mean tokens of the few-shot answers cut to `count` instructions: (as JSON, instruction words alone)."""
    answers = [example["output"]["instructions"][:count] for example in prompt.examples]
    as_json = statistics.mean(count_tokens(json.dumps({"instructions": a})) for a in answers)
    words = statistics.mean(sum(count_tokens(i) for i in a) for a in answers)
    return as_json, words


def render_rates(prompt: Prompt, pairs: list[dict]) -> tuple[float, float]:
    """Requests/s of instruction_request, and of a bare render of the same templates with the raw text."""
    examples = [{**e["input"], "answer": json.dumps(e["output"])} for e in prompt.examples[: prompt.few_shot_count]]

    def bare(pair: dict) -> tuple[str, str]:
        side = lambda s: {"caption": pair.get(f"{s}_caption"), "alt": pair.get(f"{s}_alt"), "context": pair.get(f"{s}_context")}
        variables = {"count": 1, "page_title": pair.get("page_title"), "query": side("query"), "target": side("target"), "examples": examples}
        return compiled_template(prompt.system).render(**variables), compiled_template(prompt.user).render(**variables)

    ours, raw = [], []
    for _ in range(RENDER_ROUNDS):  # alternate, so that load from other processes hits both sides alike
        started = time.perf_counter()
        for pair in pairs:
            instruction_request(prompt, pair, 1, 0)
        ours.append(time.perf_counter() - started)
        started = time.perf_counter()
        for pair in pairs:
            bare(pair)
        raw.append(time.perf_counter() - started)
    return len(pairs) / min(ours), len(pairs) / min(raw)


def row(name: str, value: float, unit: str, baseline: float, goal: str) -> dict:
    return {"name": name, "value": round(value, 2), "unit": unit, "baseline": round(baseline, 2),
            "ratio": round(value / baseline, 3) if baseline else None, "goal": goal}


def run() -> list[dict]:
    tokenizer_name, count_tokens = token_counter()
    instruct, caption = load_prompt("instruct", INSTRUCTION), load_prompt("caption", CAPTION)
    example_captions = [e["output"]["caption"] for e in caption.examples]
    pairs = [with_example_captions(p, example_captions) for p in page_pairs()]
    web_text = statistics.mean(web_text_tokens(p, count_tokens) for p in pairs)
    rows: list[dict] = []
    requests = [instruction_request(instruct, p, 1, 0) for p in pairs]
    system = count_tokens(requests[0].messages[0].text) + CHAT_TEMPLATE_TOKENS
    rows.append(row("instruct_cacheable_prefix_tokens", system, f"tokens ({tokenizer_name})",
                    statistics.mean(request_tokens(r, count_tokens) for r in requests),
                    "informational: the system message, the same for every request (prefix caching)"))
    for count in (1, 3):
        prompt_tokens = statistics.mean(request_tokens(instruction_request(instruct, p, count, 0), count_tokens) for p in pairs)
        rows.append(row(f"instruct_prompt_tokens_per_triplet_n{count}", prompt_tokens / count, f"tokens ({tokenizer_name})",
                        web_text / count, "informational: prompt overhead over the web text it carries"))
        as_json, words = answer_tokens(instruct, count, count_tokens)
        rows.append(row(f"instruct_answer_tokens_per_triplet_n{count}", as_json / count, f"tokens ({tokenizer_name})",
                        words / count, "informational: JSON overhead over the instructions"))

    # one image stands for the same URL on a page; the cache key is the image hash, which is at least as shared
    images = {p[f"{side}_sha256"] for p in pairs for side in ("query", "target")}
    caption_answer = statistics.mean(count_tokens(json.dumps({"caption": c})) for c in example_captions)
    caption_prompt = statistics.mean(request_tokens(caption_request(caption, b"", key, 0), count_tokens) for key in sorted(images))
    image_tokens = image_tokens_per_photo()
    per_image = caption_prompt + image_tokens + caption_answer
    rows.append(row("captioner_tokens_per_triplet_n1", per_image * len(images) / len(pairs),
                    f"tokens ({tokenizer_name}; image as Qwen2-VL)", per_image * 2,
                    f"lower is better: {len(images)} distinct images in {len(pairs)} pairs, each captioned once; "
                    f"per image {caption_prompt:.0f} prompt + {image_tokens:.0f} image + {caption_answer:.0f} answer tokens"))
    ours, bare = render_rates(instruct, pairs)
    rows.append(row("instruct_prompt_render_requests_per_s", ours, "requests/s", bare, ">= 0.5 (cleaning, capping, sampling)"))
    return rows
