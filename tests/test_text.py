"""pipeline/text.py: the one set of text-hygiene rules that mining and `instruct` share."""

from __future__ import annotations

import pytest
from fastwarc.warc import ArchiveIterator, WarcRecordType
from selectolax.lexbor import LexborHTMLParser

from magiclens.pipeline.filters import url_tokens
from magiclens.pipeline.text import clean_text, cut_at_sentence, is_boilerplate, word_tokens
from magiclens.pipeline.writers import WriterRejected
from magiclens.pipeline.writers.template import TemplateWriter


def _alt_texts_of(warc_path, page_url: str) -> list[str]:
    with open(warc_path, "rb") as stream:
        for record in ArchiveIterator(stream, record_types=WarcRecordType.response):
            if record.headers.get("WARC-Target-URI") == page_url:
                return [img.attributes.get("alt") or "" for img in LexborHTMLParser(record.reader.read()).css("img")]
    raise AssertionError(f"{page_url} not in {warc_path}")


def test_navigation_placeholder_alt_of_a_real_page_is_boilerplate(shared_data):
    # archive.org's 2008 home page labels menu images "(navigation image)"; the demo once wrote
    # "show me (navigation image)" from it.
    alts = _alt_texts_of(shared_data / "warc/webarchive/aut_example.warc.gz", "http://www.archive.org/index.php")
    assert "(navigation image)" in alts and "(wayback logo)" in alts
    assert clean_text("(navigation image)") == clean_text("(wayback logo)") == ""
    pair = {"pair_id": "p", "target_alt": "(navigation image)", "target_context": "", "query_alt": "Moving Images"}
    with pytest.raises(WriterRejected, match="no_target_text"):
        TemplateWriter().write(pair)


@pytest.mark.parametrize(
    "text",
    ["read more", "Read More »", "Bekijk mediafragment", "Lire la suite", "Weiterlesen", "Leer más", "click here",
     "Santé 15 tutoriels", "Cuisine (42)", "[image]", "(navigation image)"],
)
def test_link_labels_menu_counts_and_placeholders_are_boilerplate(text):
    assert is_boilerplate(text) and clean_text(text) == ""


@pytest.mark.parametrize(
    "text",
    ["Chelsea the cat", "Bekijk de Eiffeltoren bij nacht", "The 15 best hiking trails in Utah",
     "Santé publique: une campagne de vaccination à Lyon"],
)
def test_text_that_describes_something_is_kept(text):
    assert clean_text(text) == text


def test_tokens_of_urls_and_class_names_are_accent_free_and_split():
    # a decomposed accent (o + U+0302, percent-encoded) must not hide the word "icone"/"icon"
    assert "icone" in word_tokens("https://example.fr/img/Ico%CC%82ne-sante.png")
    assert word_tokens("LOCLogoSmall") == ["loc", "logo", "small"]
    assert word_tokens("about-us-bg.png") == ["about", "us", "bg", "png"]
    assert "logo" in url_tokens("https://www.loc.gov/images/LOCLogoSmall.gif")


def test_page_text_is_cut_at_a_sentence_boundary():
    text = "The bridge opened in 1932. It carries eight lanes of traffic across the harbour and a railway line."
    assert cut_at_sentence(text, 60) == "The bridge opened in 1932."
    assert cut_at_sentence("one two three four five six", 12) == "one two"
    assert cut_at_sentence("short", 60) == "short"


def test_template_writer_never_uses_the_text_both_images_share():
    pair = {"pair_id": "p", "target_alt": "Harbour bridge", "query_alt": "Harbour bridge",
            "target_context": "The bridge at night, lit for the new year. More text follows here."}
    [instruction] = TemplateWriter().write(pair)
    assert "Harbour bridge" not in instruction and "The bridge at night, lit for the new year." in instruction
