"""Checks on what a model answered: parseable, following the prompt's schema, and sensible.

Model output is untrusted like web text: an answer that is not one JSON object of the prompt's
schema is rejected whole (`unparseable_output`, `schema_mismatch`; parsing never raises anything
else, however deeply the answer nests); each instruction in a valid answer is checked on its own
(`instruction_problem`: empty, too short or long, control or format characters, e-mail addresses,
URLs of any scheme or spelled out ("dot com", "[at]"), chat role markers, markup, "image 1"/"the
second image", signs of an injected prompt, copies of the alt text or of five consecutive words of
the web text), then for duplicates and surplus. Rejects carry the raw output, capped.

The checks look at a normalised copy of the text (`text_for_checks`): NFKC folds full-width and
other compatibility forms ("ｈｔｔｐ：" is "http:"), then Cyrillic and Greek letters that look like
Latin ones are read as those ("Ignоre" with a Cyrillic о is "Ignore"). What is kept is the text as
the model wrote it.
"""

from __future__ import annotations

import json
import re
import unicodedata

import jsonschema

from magiclens.pipeline.writers import WriterRejected

RAW_OUTPUT_CHARS = 400

# Cyrillic and Greek letters drawn like a Latin letter, as the Latin letter (for the checks only).
_LATIN_LOOKALIKES = str.maketrans(
    "аеорсухіјѕԁһԛԝӏӀвкмнтАВЕКМНОРСТУХІЈЅ"  # Cyrillic
    "αβεικνορτυχΑΒΕΖΗΙΚΜΝΟΡΤΥΧ",  # Greek
    "aeopcyxijsdhqwllbkmhtABEKMHOPCTYXIJS"
    "abeikvoptuxABEZHIKMNOPTYX",
)
# Whitespace that a model may write; every other control (Cc) or format (Cf) character, a
# surrogate, a private-use or an unassigned code point is a reject (direction overrides, NUL, BEL).
_ORDINARY_WHITESPACE = frozenset("\t\n\r")
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_TLD = r"(?:com|org|net|edu|gov|io|co|uk|de|fr|ru|cn|jp|info|biz|xyz|top|site|online|shop|store|app|dev|me|tv)"
# any scheme followed by //, or the schemes that need none (a script, inline data, a mail or phone link)
_URL_SCHEME = re.compile(
    r"\b[a-z][a-z0-9+.-]*://|\b(?:javascript|vbscript|data|mailto|tel|sms|file|blob|about|magnet|intent):", re.IGNORECASE
)
_SPELLED_OUT_LINK = re.compile(
    rf"\bdot\s*{_TLD}\b|[\[({{<]\s*(?:dot|at)\s*[\])}}>]|\bw\s*w\s*w\s+dot\b", re.IGNORECASE
)
# a chat template's role marker or special token, as the model would see the start of a new turn
_ROLE_MARKER = re.compile(
    r"(?:^|[\s\[(<\"'])(?:system|assistant|user|developer|human)\s*:|<\|[a-z_]+\|>|\[/?inst\]|<</?sys>>",
    re.IGNORECASE,
)
_CODE_FENCE = re.compile(r"^```[a-zA-Z]*\s*\n?(.*?)\n?```$", re.DOTALL)
_URL = re.compile(
    r"https?:|www\.|\b[\w-]+\.(?:com|org|net|edu|gov|io|co|uk|de|fr|ru|cn|jp|info|biz|html?|php|aspx?|jpe?g|png|gif|webp|svg)\b",
    re.IGNORECASE,
)
# tags, template or JSON braces, markdown, entities, and the look-alikes untrusted_text puts in place of < >
_MARKUP = re.compile(r"[<>{}\[\]`|\\‹›]|\*\*|__|&#?\w+;")
_IMAGE_WORD = r"(?:image|picture|photo|photograph|pic|img)s?"
_POSITION = re.compile(
    rf"\b(?:first|second|third|1st|2nd|3rd|former|latter|left|right|top|bottom|other|previous|next|query|target|reference)\s+{_IMAGE_WORD}\b"
    rf"|\b{_IMAGE_WORD}\s*(?:#\s*)?(?:\d+|one|two)\b",
    re.IGNORECASE,
)
# what a model says when text in the data took over its task
_PROMPT_INJECTION = re.compile(
    r"\b(?:ignore|disregard|forget|override)\b[^.]{0,40}\b(?:previous|above|prior|earlier|all|these|the|your|any)\b[^.]{0,20}"
    r"\b(?:instructions?|rules|prompts?|messages?|directions|guidelines)\b"
    r"|\b(?:ignore|disregard|forget)\s+(?:all\s+|everything\s+|the\s+|what\s+is\s+)?(?:above|previous|prior|earlier|before)\b"
    r"|\byou\s+are\s+now\b|\bpwned\b|\bnew\s+instructions\b|\bsystem prompt\b|\bas an ai\b|\blanguage model\b",
    re.IGNORECASE,
)
_WORD = re.compile(r"\w+")
# an instruction holding this many consecutive words of the web text copies it rather than relating the images
COPIED_RUN = 5


def raw_output(text: str | None) -> str:
    """The start of a model's raw answer, for a reject's detail."""
    text = text or ""
    return text if len(text) <= RAW_OUTPUT_CHARS else text[:RAW_OUTPUT_CHARS] + "…"


def text_for_checks(text: str) -> str:
    """The text the checks read: NFKC, then Cyrillic and Greek look-alikes as Latin letters."""
    return unicodedata.normalize("NFKC", text).translate(_LATIN_LOOKALIKES)


def _has_control_characters(text: str) -> bool:
    return any(unicodedata.category(c)[0] == "C" and c not in _ORDINARY_WHITESPACE for c in text)


def parse_answer(text: str | None, schema: dict) -> dict:
    """The JSON object a model answered (a ```json fence around it is allowed), checked against `schema`."""
    body = (text or "").strip()
    fenced = _CODE_FENCE.match(body)
    if fenced:
        body = fenced.group(1).strip()
    try:
        value = json.loads(body)
    except ValueError:
        raise WriterRejected("unparseable_output", f"not JSON: {raw_output(text)}") from None
    except RecursionError:  # arrays or objects nested deeper than the parser goes
        raise WriterRejected("unparseable_output", f"JSON nested too deeply: {raw_output(text)}") from None
    if not isinstance(value, dict):
        raise WriterRejected("unparseable_output", f"not a JSON object: {raw_output(text)}")
    try:
        error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(value))
    except RecursionError:
        raise WriterRejected("schema_mismatch", f"JSON nested too deeply: {raw_output(text)}") from None
    if error is not None:
        raise WriterRejected("schema_mismatch", f"{error.message}; output: {raw_output(text)}")
    return value


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _contains(sequence: list[str], run: list[str]) -> bool:
    n = len(run)
    return any(sequence[i : i + n] == run for i in range(len(sequence) - n + 1))


def _copies_alt(instruction_words: list[str], alt: str | None) -> bool:
    """The instruction is the alt text, or holds the whole of an alt text of four words or more."""
    alt_words = words(text_for_checks(alt or ""))
    return bool(alt_words) and (instruction_words == alt_words or (len(alt_words) >= 4 and _contains(instruction_words, alt_words)))


def _copies_run(instruction_words: list[str], text: str | None) -> bool:
    """The instruction holds COPIED_RUN consecutive words of the text."""
    text_words = words(text_for_checks(text or ""))
    return any(
        _contains(text_words, instruction_words[i : i + COPIED_RUN]) for i in range(len(instruction_words) - COPIED_RUN + 1)
    )


def instruction_problem(instruction: object, pair: dict, min_words: int, max_words: int) -> str | None:
    """Why an instruction cannot be used (a reject reason), or None when it can."""
    if not isinstance(instruction, str) or not instruction.strip():
        return "empty_instruction"
    if _has_control_characters(instruction):
        return "control_character"
    text = text_for_checks(instruction)
    if _EMAIL.search(text):
        return "contains_email"
    if _URL_SCHEME.search(text) or _URL.search(text):
        return "contains_url"
    if _SPELLED_OUT_LINK.search(text):
        return "spelled_out_link"
    if _ROLE_MARKER.search(text):
        return "role_marker"
    if _PROMPT_INJECTION.search(text):
        return "prompt_injection"
    count = len(instruction.split())
    if count < min_words:
        return "too_short"
    if count > max_words:
        return "too_long"
    if _MARKUP.search(text):
        return "contains_markup"
    if _POSITION.search(text):
        return "mentions_image_position"
    instruction_words = words(text)
    if _copies_alt(instruction_words, pair.get("target_alt")) or _copies_alt(instruction_words, pair.get("query_alt")):
        return "copies_alt_text"
    web_text = ("query_alt", "target_alt", "query_context", "target_context", "page_title")
    if any(_copies_run(instruction_words, pair.get(field)) for field in web_text):
        return "copies_web_text"
    return None


def check_instructions(
    answer: dict, pair: dict, count: int, min_words: int, max_words: int
) -> tuple[list[str], list[tuple[str, str]]]:
    """The first `count` usable instructions of an answer, and (instruction, reason) for every other one."""
    kept: list[str] = []
    rejected: list[tuple[str, str]] = []
    seen: set[tuple[str, ...]] = set()
    for instruction in answer.get("instructions", []):
        text = " ".join(instruction.split()) if isinstance(instruction, str) else instruction
        reason = instruction_problem(text, pair, min_words, max_words)
        if reason is None and tuple(words(text)) in seen:
            reason = "duplicate"
        if reason is None and len(kept) >= count:
            reason = "surplus"
        if reason is None:
            kept.append(text)
            seen.add(tuple(words(text)))
        else:
            rejected.append((str(text), reason))
    return kept, rejected


def check_caption(answer: dict, min_words: int, max_words: int) -> str:
    """The caption of a parsed answer, whitespace collapsed; raises WriterRejected when unusable."""
    caption = " ".join(str(answer.get("caption", "")).split())
    count = len(caption.split())
    if count == 0:
        raise WriterRejected("empty_caption", json.dumps(answer)[:RAW_OUTPUT_CHARS])
    if count < min_words:
        raise WriterRejected("too_short", caption)
    if count > max_words:
        raise WriterRejected("too_long", raw_output(caption))
    return caption
