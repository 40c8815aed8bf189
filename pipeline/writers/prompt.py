"""Prompt files: loading, checking, and rendering them into chat requests.

A prompt file (prompts/*.yaml) holds a name and version (`prompt_id` = name@version, recorded in
every triplet and in the caption cache), Jinja2 system and user templates, a pool of few-shot
examples of which `few_shot.count` are sampled per request (seeded by the element, so reruns are
reproducible), sampling parameters, per-field caps on untrusted text, the JSON Schema the answer
must follow, and the word limits of the answers.

Web text (alt text, nearby text, page titles) and model output (captions) are untrusted: before
they reach a template they are cleaned by `untrusted_text`, which caps their length and removes
what could end the data block they sit in or forge a chat control token.
"""

from __future__ import annotations

import hashlib
import json
import random
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import jsonschema
import yaml
from apache_beam.io.filesystems import FileSystems
from jinja2 import StrictUndefined, Template, TemplateError
from jinja2.sandbox import SandboxedEnvironment

from magiclens.pipeline.writers.chat import ChatMessage, ChatRequest

CAPTION = "caption"
INSTRUCTION = "instruction"

# Characters of untrusted text kept per field unless the prompt file says otherwise.
DEFAULT_LIMITS = {"alt": 300, "context": 600, "caption": 600, "title": 200}
DEFAULT_VALIDATION = {"min_words": 3, "max_words": 40}

PROMPT_FILE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["name", "version", "kind", "system", "user", "sampling", "output"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9][a-z0-9_-]*$"},
        "version": {"type": ["integer", "string"], "pattern": "^[A-Za-z0-9._-]+$"},
        "kind": {"enum": [CAPTION, INSTRUCTION]},
        "description": {"type": "string"},
        "system": {"type": "string", "minLength": 1},
        "user": {"type": "string", "minLength": 1},
        "few_shot": {
            "type": "object",
            "required": ["count", "examples"],
            "additionalProperties": False,
            "properties": {
                "count": {"type": "integer", "minimum": 0},
                "examples": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["input", "output"],
                        "properties": {"input": {"type": "object"}, "output": {"type": "object"}},
                    },
                },
            },
        },
        "sampling": {
            "type": "object",
            "required": ["temperature", "top_p", "max_tokens"],
            "additionalProperties": False,
            "properties": {
                "temperature": {"type": "number", "minimum": 0},
                "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                "max_tokens": {"type": "integer", "minimum": 1},
            },
        },
        "limits": {
            "type": "object",
            "additionalProperties": False,
            "properties": {key: {"type": "integer", "minimum": 1} for key in DEFAULT_LIMITS},
        },
        "output": {
            "type": "object",
            "required": ["schema"],
            "additionalProperties": False,
            "properties": {"schema": {"type": "object"}},
        },
        "validation": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"min_words": {"type": "integer", "minimum": 1}, "max_words": {"type": "integer", "minimum": 1}},
        },
    },
}

_TEMPLATES = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=False)


@lru_cache(maxsize=64)
def compiled_template(text: str) -> Template:
    """A prompt template compiled once per process (sandboxed; an undefined variable is an error)."""
    return _TEMPLATES.from_string(text)


class PromptError(SystemExit):
    """A prompt file that cannot be used; the message says which file and what to fix."""


@dataclass(frozen=True)
class Prompt:
    name: str
    version: str
    kind: str  # CAPTION or INSTRUCTION
    system: str
    user: str
    few_shot_count: int
    examples: tuple[dict, ...]
    example_answers: tuple[dict, ...]  # per example: {count: its answer as JSON, lists cut to count; None: whole}
    temperature: float
    top_p: float
    max_tokens: int
    limits: dict[str, int]
    output_schema: dict
    min_words: int
    max_words: int
    source: str  # where it was read from, for error messages

    @property
    def prompt_id(self) -> str:
        return f"{self.name}@{self.version}"


def resolve_prompt_path(name_or_path: str) -> str:
    """A bare name ("instruct") means the shipped prompts/NAME.yaml; anything else is a path or URL."""
    from magiclens.prompts import bundled_prompt, bundled_prompt_names

    if "/" not in name_or_path and not name_or_path.endswith((".yaml", ".yml")):
        bundled = bundled_prompt(name_or_path)
        if bundled is None:
            raise PromptError(f"no shipped prompt named {name_or_path!r}; shipped: {', '.join(bundled_prompt_names())}, or give a path")
        return str(bundled)
    return name_or_path


def load_prompt(name_or_path: str, kind: str) -> Prompt:
    """Read and check a prompt file (local, gs:// or any Beam FileSystems path) of the given kind."""
    path = resolve_prompt_path(name_or_path)
    try:
        with FileSystems.open(path) as handle:
            raw = yaml.safe_load(handle.read().decode("utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as error:
        raise PromptError(f"cannot read prompt file {path}: {error}") from error
    return prompt_from_dict(raw, kind, source=path)


def prompt_from_dict(raw: Any, kind: str, source: str) -> Prompt:
    try:
        jsonschema.validate(raw, PROMPT_FILE_SCHEMA)
        jsonschema.Draft202012Validator.check_schema(raw["output"]["schema"])
    except jsonschema.ValidationError as error:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise PromptError(f"prompt file {source}: {where}: {error.message}") from error
    except jsonschema.SchemaError as error:
        raise PromptError(f"prompt file {source}: output/schema is not a valid JSON Schema: {error.message}") from error
    if raw["kind"] != kind:
        raise PromptError(f"prompt file {source} has kind {raw['kind']!r}, but a {kind!r} prompt is needed here")
    for field in ("system", "user"):
        try:
            compiled_template(raw[field])
        except TemplateError as error:
            raise PromptError(f"prompt file {source}: {field} is not a valid Jinja2 template: {error}") from error
    few_shot = raw.get("few_shot") or {"count": 0, "examples": []}
    validation = {**DEFAULT_VALIDATION, **raw.get("validation", {})}
    if validation["min_words"] > validation["max_words"]:
        raise PromptError(f"prompt file {source}: validation/min_words is above validation/max_words")
    return Prompt(
        name=raw["name"],
        version=str(raw["version"]),
        kind=raw["kind"],
        system=raw["system"],
        user=raw["user"],
        few_shot_count=few_shot["count"],
        examples=tuple(few_shot["examples"]),
        example_answers=tuple(_answers(example["output"]) for example in few_shot["examples"]),
        temperature=float(raw["sampling"]["temperature"]),
        top_p=float(raw["sampling"]["top_p"]),
        max_tokens=int(raw["sampling"]["max_tokens"]),
        limits={**DEFAULT_LIMITS, **raw.get("limits", {})},
        output_schema=raw["output"]["schema"],
        min_words=validation["min_words"],
        max_words=validation["max_words"],
        source=source,
    )


def untrusted_text(text: str | None, limit: int) -> str:
    """Web or model text made safe to place between data delimiters in a prompt.

    Control and format characters (zero-width, bidi overrides) become spaces, angle brackets become
    look-alike quotes so the text can neither close its delimiter nor spell a chat control token such
    as <|im_start|>, whitespace is collapsed, and the result is cut to `limit` characters at a word
    boundary.
    """
    if not text:
        return ""
    text = " ".join(unicodedata.normalize("NFC", text).split())
    if not text.isprintable():  # rare: look at each character only then
        text = " ".join("".join(" " if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") else ch for ch in text).split())
    text = text.replace("<", "‹").replace(">", "›")
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    if " " in cut[limit // 2 :]:
        cut = cut[: cut.rindex(" ")]
    return cut.rstrip() + "…"


def request_seed(seed: int, prompt_id: str, key: str) -> int:
    """A per-element seed: the same element, prompt and --seed always sample the same way."""
    digest = hashlib.sha256(f"{seed}\x1f{prompt_id}\x1f{key}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def _answers(output: dict) -> dict[int | None, str]:
    """An example's answer as the model should write it, whole (None) and with its lists cut to 1, 2, ... items."""
    longest = max((len(v) for v in output.values() if isinstance(v, list)), default=0)
    answers: dict[int | None, str] = {None: json.dumps(output, ensure_ascii=False)}
    for count in range(1, longest):
        answers[count] = json.dumps({k: v[:count] if isinstance(v, list) else v for k, v in output.items()}, ensure_ascii=False)
    return answers


def sample_examples(prompt: Prompt, seed: int, count: int | None = None) -> list[dict]:
    """`few_shot.count` examples drawn by the seed, each with the answer for `count` instructions."""
    chosen = random.Random(seed).sample(range(len(prompt.examples)), min(prompt.few_shot_count, len(prompt.examples)))
    return [
        {**prompt.examples[i]["input"], "answer": prompt.example_answers[i].get(count, prompt.example_answers[i][None])}
        for i in chosen
    ]


def _request(prompt: Prompt, variables: dict, seed: int, images: tuple[bytes, ...] = ()) -> ChatRequest:
    try:
        system = compiled_template(prompt.system).render(**variables).strip()
        user = compiled_template(prompt.user).render(**variables).strip()
    except TemplateError as error:
        raise PromptError(f"prompt file {prompt.source} does not render: {error}") from error
    return ChatRequest(
        messages=(ChatMessage("system", system), ChatMessage("user", user, images)),
        temperature=prompt.temperature,
        top_p=prompt.top_p,
        max_tokens=prompt.max_tokens,
        seed=seed,
    )


def _side(pair: dict, side: str, limits: dict[str, int]) -> dict[str, str]:
    return {
        "caption": untrusted_text(pair.get(f"{side}_caption"), limits["caption"]),
        "alt": untrusted_text(pair.get(f"{side}_alt"), limits["alt"]),
        "context": untrusted_text(pair.get(f"{side}_context"), limits["context"]),
    }


def instruction_request(prompt: Prompt, pair: dict, count: int, seed: int) -> ChatRequest:
    """The request asking for `count` instructions from the pair's query image to its target."""
    element_seed = request_seed(seed, prompt.prompt_id, pair["pair_id"])
    variables = {
        "count": count,
        "page_title": untrusted_text(pair.get("page_title"), prompt.limits["title"]),
        "query": _side(pair, "query", prompt.limits),
        "target": _side(pair, "target", prompt.limits),
        "examples": sample_examples(prompt, element_seed, count),
    }
    return _request(prompt, variables, element_seed)


def caption_request(prompt: Prompt, image: bytes, image_sha256: str, seed: int) -> ChatRequest:
    """The request asking for a caption of one image (the image alone: no web text goes in)."""
    element_seed = request_seed(seed, prompt.prompt_id, image_sha256)
    return _request(prompt, {"examples": sample_examples(prompt, element_seed)}, element_seed, images=(image,))
