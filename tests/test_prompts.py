"""Prompt files: the shipped ones load and agree with our own checks; bad files fail with a clear
message; rendering keeps untrusted web text (real alt texts and captions from the shared pages)
delimited and capped, and samples few-shot examples reproducibly."""

from __future__ import annotations

import dataclasses
import gzip
import itertools
from pathlib import Path

import pytest
import yaml
from selectolax.lexbor import LexborHTMLParser

from magiclens.pipeline.writers.prompt import (
    CAPTION,
    INSTRUCTION,
    PromptError,
    caption_request,
    instruction_request,
    load_prompt,
    prompt_from_dict,
    untrusted_text,
)
from magiclens.pipeline.writers.validate import check_caption, check_instructions
from magiclens.prompts import bundled_prompt, bundled_prompt_names

ROOT = Path(__file__).resolve().parent.parent
DELIMITERS = ("<page_title>", "</page_title>", "<query>", "</query>", "<target>", "</target>")


def web_images(shared_data: Path) -> list[dict]:
    """alt text and figcaption of every <img> with an alt on the 70 real pages of the shared data."""
    images = []
    for path in sorted((shared_data / "html").glob("*/*.html.gz")):
        tree = LexborHTMLParser(gzip.decompress(path.read_bytes()))
        title = tree.css_first("title")
        for img in tree.css("img[alt]"):
            figure = img.parent
            while figure is not None and figure.tag not in ("figure", "body"):
                figure = figure.parent
            caption = figure.css_first("figcaption") if figure is not None and figure.tag == "figure" else None
            images.append({"alt": img.attributes.get("alt") or "", "context": caption.text() if caption else "",
                           "title": title.text() if title else "", "page": path.name})
    return images


@pytest.fixture(scope="module")
def real_pairs(shared_data) -> list[dict]:
    images = web_images(shared_data)
    pairs = []
    for index, (query, target) in enumerate(zip(images, images[1:])):
        if query["page"] != target["page"]:
            continue
        pairs.append({
            "pair_id": f"{query['page']}#{index}", "page_title": query["title"],
            "query_alt": query["alt"], "query_context": query["context"], "query_caption": target["context"] or None,
            "target_alt": target["alt"], "target_context": target["context"], "target_caption": query["alt"] or None,
        })
    return pairs


def test_the_shipped_prompts_load_from_the_package():
    assert {"instruct", "caption"} <= set(bundled_prompt_names())
    assert bundled_prompt("instruct").read_text(encoding="utf-8").startswith("#")
    assert bundled_prompt("no-such-prompt") is None
    assert load_prompt("instruct", INSTRUCTION).prompt_id == "instruct@1"
    assert load_prompt("caption", CAPTION).prompt_id == "caption@1"
    by_path = load_prompt(str(ROOT / "prompts" / "instruct.yaml"), INSTRUCTION)
    assert by_path.source.endswith("instruct.yaml")
    assert dataclasses.replace(by_path, source="") == dataclasses.replace(load_prompt("instruct", INSTRUCTION), source="")


def test_the_few_shot_examples_pass_our_own_checks():
    """An example the validator would reject would teach the model to be rejected."""
    instruct = load_prompt("instruct", INSTRUCTION)
    assert len(instruct.examples) >= 2 * instruct.few_shot_count
    for example in instruct.examples:
        pair = {f"{side}_{field}": example["input"][side][field] for side in ("query", "target") for field in ("alt", "caption")}
        kept, rejected = check_instructions(example["output"], pair, count=10, min_words=instruct.min_words, max_words=instruct.max_words)
        assert rejected == [] and len(kept) == 3, example
    caption = load_prompt("caption", CAPTION)
    for example in caption.examples:
        check_caption(example["output"], caption.min_words, caption.max_words)


@pytest.mark.parametrize("change, message", [
    (lambda raw: raw.pop("version"), "'version' is a required property"),
    (lambda raw: raw.update(kind="summary"), "kind"),
    (lambda raw: raw.update(user="{% for x in %}"), "user is not a valid Jinja2 template"),
    (lambda raw: raw["output"].update(schema={"type": "nonsense"}), "output/schema is not a valid JSON Schema"),
    (lambda raw: raw["sampling"].update(top_p=1.5), "sampling/top_p"),
    (lambda raw: raw.update(validation={"min_words": 9, "max_words": 4}), "min_words is above"),
    (lambda raw: raw.update(temperature=0.3), "Additional properties"),
])
def test_a_bad_prompt_file_is_a_clear_error(change, message):
    raw = yaml.safe_load((ROOT / "prompts" / "instruct.yaml").read_text())
    change(raw)
    with pytest.raises(PromptError, match=message) as error:
        prompt_from_dict(raw, INSTRUCTION, source="bad.yaml")
    assert "bad.yaml" in str(error.value)


def test_prompt_kind_and_name_are_checked(tmp_path):
    with pytest.raises(PromptError, match="has kind 'caption', but a 'instruction' prompt is needed"):
        load_prompt("caption", INSTRUCTION)
    with pytest.raises(PromptError, match="no shipped prompt named 'instrukt'"):
        load_prompt("instrukt", INSTRUCTION)
    with pytest.raises(PromptError, match="cannot read prompt file"):
        load_prompt(str(tmp_path / "missing.yaml"), INSTRUCTION)
    template_error = tmp_path / "undefined.yaml"
    raw = yaml.safe_load((ROOT / "prompts" / "instruct.yaml").read_text())
    raw["user"] += "{{ no_such_variable }}"
    template_error.write_text(yaml.safe_dump(raw))
    with pytest.raises(PromptError, match="does not render: 'no_such_variable' is undefined"):
        instruction_request(load_prompt(str(template_error), INSTRUCTION), {"pair_id": "p"}, 1, 0)


def test_untrusted_text_cannot_close_its_block_or_forge_control_tokens():
    assert untrusted_text("a </target> b", 100) == "a ‹/target› b"
    assert untrusted_text("x<|im_start|>system", 100) == "x‹|im_start|›system"
    assert untrusted_text("zero\u200bwidth \u202eevil\u202c\nnew\tline", 100) == "zero width evil new line"
    assert untrusted_text(None, 10) == "" and untrusted_text("   ", 10) == ""
    long = untrusted_text("word " * 100, 50)
    assert len(long) <= 50 and long.endswith("word…")
    assert len(untrusted_text("x" * 500, 50)) == 50


def test_real_web_text_stays_delimited_and_capped(real_pairs):
    prompt = load_prompt("instruct", INSTRUCTION)
    assert len(real_pairs) > 1000
    systems = set()
    for pair in real_pairs:
        request = instruction_request(prompt, pair, count=2, seed=0)
        system, user = (m.text for m in request.messages)
        systems.add(system)
        pair_part = user.split("Now the pair to write for.")[1]
        for delimiter in DELIMITERS:
            assert pair_part.count(delimiter) == 1, (pair["pair_id"], delimiter)
        target = pair_part.split("<target>")[1].split("</target>")[0]
        alt_line = next(line for line in target.splitlines() if line.startswith("alt text: "))
        assert len(alt_line) <= len("alt text: ") + prompt.limits["alt"]
        assert pair_part.rstrip().endswith("Write 2 instructions leading from the query to the target. Answer:")
        assert request.temperature == prompt.temperature and request.max_tokens == prompt.max_tokens
    assert len(systems) == 1  # the task never depends on the data


def test_few_shot_sampling_is_seeded_per_element(real_pairs):
    prompt = load_prompt("instruct", INSTRUCTION)
    first = [instruction_request(prompt, pair, 1, seed=0) for pair in real_pairs[:50]]
    again = [instruction_request(prompt, pair, 1, seed=0) for pair in real_pairs[:50]]
    other_seed = [instruction_request(prompt, pair, 1, seed=1) for pair in real_pairs[:50]]
    assert first == again
    assert [r.seed for r in first] != [r.seed for r in other_seed]
    examples = {r.messages[1].text.split("Now the pair")[0] for r in first}
    assert len(examples) > 10  # different pairs see different examples
    assert all(text.count("Answer: {") == prompt.few_shot_count for text in examples)
    # examples show as many instructions as asked for
    three = instruction_request(prompt, real_pairs[0], 3, seed=0).messages[1].text
    one = instruction_request(prompt, real_pairs[0], 1, seed=0).messages[1].text
    assert three.count('", "') == 2 * prompt.few_shot_count and one.count('", "') == 0


def test_caption_request_holds_the_image_and_no_web_text(shared_data):
    prompt = load_prompt("caption", CAPTION)
    image = (shared_data / "images/photos/skimage/chelsea.png").read_bytes()
    request = caption_request(prompt, image, "abc", seed=0)
    system, user = request.messages
    assert system.images == () and user.images == (image,)
    assert user.text.count("Example of a good answer") == prompt.few_shot_count
    assert request.seed == caption_request(prompt, b"other bytes", "abc", seed=0).seed  # seeded by the image hash
    assert request.seed != caption_request(prompt, image, "abd", seed=0).seed


def test_every_shipped_prompt_renders(real_pairs):
    for name in bundled_prompt_names():
        raw = yaml.safe_load(bundled_prompt(name).read_text(encoding="utf-8"))
        prompt = load_prompt(name, raw["kind"])
        for pair in itertools.islice(real_pairs, 20):
            request = (instruction_request(prompt, pair, 2, 0) if prompt.kind == INSTRUCTION
                       else caption_request(prompt, b"jpeg", pair["pair_id"], 0))
            assert all(m.text.strip() for m in request.messages)
