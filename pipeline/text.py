"""Text hygiene for web text (alt, title, captions, nearby text), shared by mining and `instruct`.

One set of rules decides what text says something about a picture, so that the reference filters
(pipeline/filters.py) and the instruction writers (pipeline/writers/) agree. Only ftfy and the
standard library: `instruct` imports this without any mining library.

  clean_text     mojibake and entities fixed, markup and whitespace collapsed, a "Photo:" label
                 prefix dropped; "" when what is left is boilerplate
  is_boilerplate a label word ("Image 3"), a file name, a URL, a bare credit, a link or
                 call-to-action label ("read more", "Bekijk mediafragment"), a menu label with a
                 count ("Santé 15 tutoriels"), a placeholder in brackets ("(navigation image)")
  word_tokens    lower-case words of a URL, a class name or a text: percent-decoded, accents
                 stripped (NFKD), split on separators and camelCase ("LOCLogoSmall" -> loc logo small)
  cut_at_sentence text cut to a length at a sentence boundary (else a word boundary), never mid-word
"""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import unquote

import ftfy

# Alt text that says nothing about the picture.
LABEL_WORDS = frozenset(
    """
    image images img photo photos photograph picture pictures pic pics foto fotos bild bilder
    imagen imagem immagine thumbnail thumb untitled placeholder null undefined none alt default
    file attachment graphic jpg jpeg png gif webp spacer logo icon navigation nav
    """.split()
)
# Link and call-to-action labels, in the languages of the crawls (lower case, accents stripped).
CALL_TO_ACTION = frozenset(
    label.strip()
    for label in """
    read more|more|click here|click|here|learn more|see more|view more|show more|details|continue reading
    read the story|watch|watch video|play|play video|view|view image|view gallery|open|zoom|enlarge|next|previous
    back|download|share|subscribe|sign up|log in|login|buy now|shop now|order now|add to cart
    lees meer|meer|bekijk|bekijk mediafragment|bekijk meer|klik hier|verder lezen
    weiterlesen|mehr|mehr lesen|mehr erfahren|hier klicken|ansehen|zum artikel
    lire la suite|en savoir plus|voir plus|cliquez ici|suite|voir
    leer mas|ver mas|haga clic aqui|seguir leyendo|leggi tutto|scopri di piu|clicca qui
    """.replace("\n", "|").split("|")
    if label.strip()
)
_FILE_NAME = re.compile(r"^[^\s/]*\.(?:jpe?g|png|gif|webp|avif|bmp|svgz?|tiff?|ico|heic)$", re.IGNORECASE)
_CAMERA_FILE_STEM = re.compile(r"^(?:img|dsc|dscn|dscf|dcim|pict?|p|photo|image|screenshot)[\s_-]*\d+\w*$", re.IGNORECASE)
_URL = re.compile(r"^(?:(?:https?:)?//|www\.)\S+$", re.IGNORECASE)
_CREDIT = re.compile(r"^(?:©|\(c\)\s|copyright\b|credits?\b|photo credit\b|courtesy\b)", re.IGNORECASE)
_LABEL_PREFIX = re.compile(r"^(?:file\s+)?(?:photo|image|picture|foto|bild|img)\s*[:|–—-]\s+", re.IGNORECASE)
_BRACKETED = re.compile(r"^[(\[{<].*[)\]}>]$")
_MENU_WITH_COUNT = re.compile(r"^\D{1,40}?\s\(?\d{1,6}\)?(?:\s\w{1,20})?$")
_MARKUP = re.compile(r"<[^>]*>")
_WHITESPACE = re.compile(r"\s+")
_WORD = re.compile(r"[^\W\d_]+")
_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
_SEPARATORS = re.compile(r"[^0-9a-zA-Z]+")
_SENTENCE_END = re.compile(r"[.!?…。！？](?:[\"'”’)\]]*)(?=\s|$)")


def strip_accents(text: str) -> str:
    """NFKD, then the combining marks dropped: "Icône" and "Ico%CC%82ne" both give "Icone"."""
    return "".join(ch for ch in unicodedata.normalize("NFKD", text) if not unicodedata.combining(ch))


def word_tokens(text: str) -> list[str]:
    """Lower-case ASCII word tokens: percent-decoded, accents stripped, split on separators and camelCase."""
    plain = strip_accents(unquote(text))
    return [word.lower() for part in _SEPARATORS.split(plain) for word in _CAMEL.sub(" ", part).split()]


def _folded(text: str) -> str:
    return " ".join(word_tokens(text))


def is_boilerplate(text: str) -> bool:
    """Text that describes nothing (see the module docstring)."""
    if not _WORD.search(text):
        return True
    if _FILE_NAME.match(text) or _URL.match(text) or _CAMERA_FILE_STEM.match(text) or _CREDIT.match(text):
        return True
    if _BRACKETED.match(text) and len(text) < 40:
        return True
    folded = _folded(text)
    if folded in CALL_TO_ACTION or folded.rstrip(" s") in CALL_TO_ACTION:
        return True
    if _MENU_WITH_COUNT.match(text) and len(text.split()) <= 4:
        return True
    words = [word.lower() for word in _WORD.findall(text)]
    return all(word in LABEL_WORDS for word in words)


def clean_text(text: str | None) -> str:
    """Fix mojibake and entities, drop markup, collapse whitespace; "" for boilerplate."""
    if not text:
        return ""
    text = _WHITESPACE.sub(" ", _MARKUP.sub(" ", ftfy.fix_text(text))).strip()
    text = _LABEL_PREFIX.sub("", text)
    return "" if is_boilerplate(text) else text


def cut_at_sentence(text: str, limit: int) -> str:
    """`text` when it fits in `limit` characters, else its longest run of whole sentences that does,
    else its longest run of whole words (never a word cut in two)."""
    if len(text) <= limit:
        return text
    head = text[: limit + 1]
    ends = [match.end() for match in _SENTENCE_END.finditer(head) if match.end() <= limit]
    if ends and ends[-1] >= limit // 3:
        return head[: ends[-1]].strip()
    cut = head.rfind(" ")
    return (head[:cut] if cut > 0 else head[:limit]).strip()
