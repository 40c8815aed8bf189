"""The rule-based writer: instructions from the target's alt text, title or context.

This is the template baseline of the MagicLens paper and the offline default. Phrasings are chosen
by a hash of the pair id, so the same pairs always give the same instructions. When a captioner ran,
the target's caption stands in for an uninformative alt text.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from magiclens.pipeline.writers import WriterRejected
from magiclens.pipeline.writers.chat import Generation, GenerationTask

PHRASINGS = (
    "{text}",
    "find an image of {text}",
    "show me {text}",
    "{text}, from the same page",
    "another picture on this page: {text}",
    "an image of {text} related to this one",
)
MAX_WORDS = 20
# alt texts that say nothing about what the image shows
UNINFORMATIVE = {"image", "photo", "picture", "img", "graphic", "thumbnail", "untitled", "spacer", "logo", "icon"}
FILE_NAME = re.compile(r"^[\w\-. ]+\.(jpe?g|png|gif|webp|bmp|svg|tiff?)$", re.IGNORECASE)
MARKUP = re.compile(r"<[^>]*>|https?://\S+")


def clean_text(text: str) -> str:
    """Web text -> a short phrase: no markup or URLs, whitespace collapsed, at most MAX_WORDS words."""
    text = MARKUP.sub(" ", text or "")
    words = text.split()
    return " ".join(words[:MAX_WORDS]).strip(" .,;:-|")


def informative(text: str) -> bool:
    lowered = text.lower()
    return len(lowered) >= 3 and lowered not in UNINFORMATIVE and not FILE_NAME.match(lowered)


class TemplateWriter:
    writer_id = "template"
    prompt_id = "template@1"

    def write(self, pair: dict, count: int = 1) -> list[str]:
        for field in ("target_alt", "target_caption", "target_context"):
            text = clean_text(pair.get(field) or "")
            if informative(text):
                break
        else:
            raise WriterRejected("no_target_text", "the target has no informative alt text, caption or context")
        start = int(hashlib.sha256(pair["pair_id"].encode()).hexdigest()[:8], 16)
        return [PHRASINGS[(start + i) % len(PHRASINGS)].format(text=text) for i in range(min(count, len(PHRASINGS)))]


@dataclass
class TemplateBackend:
    """The template writer as a generation backend, so every writer runs the same way in `RunInference`.

    Its answer is the JSON a model would give ({"instructions": [...]}); being rule-built from
    cleaned text rather than model output, it is parsed but not put through the model-output checks.
    """

    count: int
    backend_id: str = TemplateWriter.writer_id

    def load(self) -> TemplateWriter:
        return TemplateWriter()

    def generate(self, writer: TemplateWriter, tasks: Sequence[GenerationTask]) -> list[Generation]:
        generations = []
        for task in tasks:
            try:
                generations.append(Generation(json.dumps({"instructions": writer.write(task.payload, self.count)})))
            except WriterRejected as rejected:
                generations.append(Generation(None, rejected.reason, rejected.detail))
        return generations
