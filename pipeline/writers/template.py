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

from magiclens.pipeline.text import clean_text, cut_at_sentence
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
# The phrase taken from the target's text: whole sentences (else whole words) up to this length.
MAX_PHRASE_CHARS = 120
_URL_IN_TEXT = re.compile(r"\S*(?:https?://|www\.)\S*")


def target_phrase(text: str | None) -> str:
    """The target's text as a short phrase for an instruction, or "" when it says nothing
    (boilerplate by pipeline/text.py's rules, which mining applies too)."""
    text = clean_text(_URL_IN_TEXT.sub(" ", text or ""))
    return cut_at_sentence(text, MAX_PHRASE_CHARS).strip(" .,;:-|") if len(text) >= 3 else ""


class TemplateWriter:
    writer_id = "template"
    prompt_id = "template@1"

    def write(self, pair: dict, count: int = 1) -> list[str]:
        query_texts = {target_phrase(pair.get(f"query_{name}")).lower() for name in ("alt", "caption", "context")}
        for field in ("target_alt", "target_caption", "target_context"):
            text = target_phrase(pair.get(field))
            # the same text on both images tells nothing about how the target differs
            if text and text.lower() not in query_texts:
                break
        else:
            raise WriterRejected("no_target_text", "the target has no informative alt text, caption or context "
                                                   "of its own (empty, boilerplate, or the same as the query's)")
        start = int(hashlib.sha256(pair["pair_id"].encode()).hexdigest()[:8], 16)
        return [PHRASINGS[(start + i) % len(PHRASINGS)].format(text=text) for i in range(min(count, len(PHRASINGS)))]


@dataclass
class TemplateBackend:
    """The template writer as a generation backend, so every writer's answers are handled the same way.

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
