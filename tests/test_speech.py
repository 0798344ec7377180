"""speech.py: every sentence we send is one avr-core sentence, and no word is lost."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from avr_llm_proxy.avr import ReplyReader, frame
from avr_llm_proxy.speech import MAX_REPLY_CHARS, MAX_SENTENCE_CHARS, SENTENCE, _shape, clean, sentences


def test_observed_stream_sentences_case_is_fixed() -> None:
    """The text avr-core mangled in reply-framing.json is spoken whole and correctly."""
    text = "Claro... El total es 3.5 euros 😀. ¿Algo más? Gracias por llamar"
    assert sentences(text) == ["Claro.", "El total es 3,5 euros.", "¿Algo más?", "Gracias por llamar."]


def test_decimals_and_thousands_are_not_split() -> None:
    """A dot inside a number would cut it in two sentences; it becomes a comma or goes."""
    assert sentences("Son 3.5 kg y 1.500 dólares") == ["Son 3,5 kg y 1500 dólares."]


def test_ellipsis_mid_sentence_becomes_a_pause() -> None:
    """An ellipsis before lower-case text is a comma, not three sentences."""
    assert sentences("Bueno... quizás mañana") == ["Bueno, quizás mañana."]


def test_repeated_marks_collapse() -> None:
    """`!!!` and `?!` end one sentence, not several empty ones."""
    assert sentences("¡Genial!!! ¿De verdad?!") == ["¡Genial!", "¿De verdad?"]


def test_markdown_and_lines() -> None:
    """Markdown marks go, links keep their text, each line ends a sentence."""
    text = "# Título\n**Negrita** y [enlace](http://x.example)\n1. uno\n2. dos"
    assert sentences(text) == ["Título.", "Negrita y enlace.", "1, uno.", "2, dos."]


def test_bracketed_citations_are_removed() -> None:
    """OpenAI-style 【…】 citations never reach the caller."""
    assert sentences("Hola 【4:0†fuente】 Juan.") == ["Hola Juan."]


def test_empty_and_symbol_only_answers_send_nothing() -> None:
    """Nothing speakable means no chunk at all, never an empty sentence."""
    assert sentences("") == [] and sentences("😀🎉") == [] and sentences("... !!! ???") == []


def test_clean_collapses_whitespace() -> None:
    """Newlines and runs of spaces become single spaces."""
    assert clean("a  b\n\nc") == "a b. c."


# Characters of plain text that some rule acts on in certain orders (so both paths are taken often),
# then every other character a rule acts on.
_NEAR_PLAIN = "a Zñ¿¡.!?,;:09-+)"
_TRICKY = _NEAR_PLAIN + "*#`~_|>[]()^•…【】\n\t\xa0\xad©😀\u0301"


@settings(max_examples=500)
@given(st.text(alphabet=_NEAR_PLAIN, max_size=12) | st.text(alphabet=_TRICKY, max_size=40) | st.text(max_size=40))
def test_plain_text_shortcut_agrees_with_every_rule(text: str) -> None:
    """The one-search shortcut for plain one-line text gives exactly what applying every rule gives."""
    assert clean(text) == _shape(text[:MAX_REPLY_CHARS])


def test_plain_spanish_answer_takes_the_shortcut() -> None:
    """Accented Spanish on one line is plain: spacing and the closing mark are all that change."""
    assert clean("  Hola Juan,  ¿en qué puedo ayudarte? ") == "Hola Juan, ¿en qué puedo ayudarte?"
    assert clean("Su pedido está en camino") == "Su pedido está en camino."


@given(st.text(max_size=400))
def test_any_text_becomes_whole_avr_sentences(text: str) -> None:
    """Whatever the API says, each sentence is exactly one avr-core match and avr-core drops nothing."""
    reader = ReplyReader()
    for sentence in sentences(text):
        assert [m.group(0) for m in SENTENCE.finditer(sentence)] == [sentence]
        assert re.search(r"\w", sentence)
        assert reader.chunk(frame(sentence)) != []
    assert reader.end() == ""


@given(st.lists(st.text(alphabet="abcdefghij áéñ", min_size=1, max_size=12), min_size=1, max_size=30))
def test_words_are_never_lost(words: list[str]) -> None:
    """Every word of a plain answer is spoken, in order."""
    text = " ".join(words)
    spoken = " ".join(sentences(text)).replace(".", " ").split()
    assert spoken == text.split()


def test_long_unpunctuated_answer_is_cut_quickly() -> None:
    """A 20 KB answer without a full stop is cut into small sentences (linear work, no stalled loop)."""
    text = "palabra " * 2500 + ","
    result = sentences(text)
    assert 1 < len(result) <= MAX_REPLY_CHARS // 100
    assert all(len(sentence) <= MAX_SENTENCE_CHARS + 1 and sentence.endswith(".") for sentence in result)
    assert " ".join(result).replace(".", " ").split() == ["palabra"] * (MAX_REPLY_CHARS // len("palabra "))


def test_hostile_patterns_do_not_explode() -> None:
    """Brackets, parentheses and spaces by the thousand are handled in one pass each."""
    for text in ("[" * 20000, "(" * 20000, " " * 20000 + ".", "a." * 20000):
        assert all(len(s) <= MAX_SENTENCE_CHARS + 1 for s in sentences(text))


def test_tabs_are_spaces() -> None:
    """A tab separates words; it never glues them."""
    assert sentences("hola\tmundo") == ["hola mundo."]


def test_long_sentence_is_cut_at_a_comma() -> None:
    """A sentence past the chunk cap is cut at a comma, each piece ending in a full stop."""
    text = ", ".join(f"elemento número {index}" for index in range(30)) + "."
    result = sentences(text)
    assert len(result) > 1 and all(s.endswith(".") and len(s) <= MAX_SENTENCE_CHARS + 1 for s in result)
    assert " ".join(result).replace(".", "").replace(",", "").split() == text.replace(",", "").rstrip(".").split()
