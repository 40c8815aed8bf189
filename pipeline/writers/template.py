"""The rule-based writer: instructions from the target's alt text, title or context.

This is the template baseline of the MagicLens paper and the offline default. Phrasings are chosen
by a hash of the pair id, so the same pairs always give the same instructions.
"""

from __future__ import annotations

import hashlib
import re

from pipeline.writers import WriterRejected

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
        for field in ("target_alt", "target_context"):
            text = clean_text(pair.get(field) or "")
            if informative(text):
                break
        else:
            raise WriterRejected("no_target_text", "the target has no informative alt text or context")
        start = int(hashlib.sha256(pair["pair_id"].encode()).hexdigest()[:8], 16)
        return [PHRASINGS[(start + i) % len(PHRASINGS)].format(text=text) for i in range(min(count, len(PHRASINGS)))]
