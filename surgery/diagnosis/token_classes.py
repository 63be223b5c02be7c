"""Sorting a tokenizer's own vocabulary into word classes, without any download.

The classes feed the static key-response diagnostic (:mod:`surgery.diagnosis.static_heads`). The rule is deliberately
simple and written down here (and in ``docs/heads.md``), applied to each token's decoded text:

1. special tokens, whitespace-only tokens and partial UTF-8 bytes (decoding to U+FFFD) get no class;
2. a digit and no letter -> ``number`` ("1999", "3.14", "%5"); one of a fixed list of English number words
   ("one", ..., "twenty", "hundred", "million") -> ``number`` as well (word-level vocabularies rarely hold
   digits);
3. neither a letter nor a digit -> ``punctuation`` (symbols included: ".", ",", "$", "--");
4. in a vocabulary that marks word starts (GPT-2's byte-level BPE: "ĠParis" decodes to " Paris"), a token
   *without* a leading space is a word piece ("ing", "Par") and gets no word class;
5. its lower-case form in a fixed list of English function words (articles, pronouns, prepositions,
   conjunctions, auxiliaries and modals) -> ``function_word`` ("the", "The", "of", "is");
6. alphabetic and starting with a capital -> ``proper_noun`` ("Paris", "France", "NASA"); this also catches
   sentence-initial common words ("Birds") — the rule uses no frequency data, so it cannot tell them apart;
7. alphabetic otherwise (lower case) -> ``common_word`` ("city", "capital");
8. anything else (mixed letters and digits, apostrophes: "mp3", "'s") gets no class.

Whether a vocabulary marks word starts is asked of the tokenizer itself: it does when ``" the"`` and ``"the"``
encode differently (GPT-2: 262 vs 1169; a whitespace-split word-level vocabulary: the same id).
"""

from __future__ import annotations

from dataclasses import dataclass

TOKEN_CLASSES = ("proper_noun", "common_word", "function_word", "punctuation", "number")

FUNCTION_WORDS = frozenset(
    """
    a an the this that these those some any each every no all both either neither such what which whose
    i me my mine myself you your yours yourself yourselves he him his himself she her hers herself it its itself
    we us our ours ourselves they them their theirs themselves who whom whoever whatever whichever
    of in on at by for with from to into onto upon about above below over under between among through
    during before after since until till against across along around behind beyond near off out up down
    within without toward towards per via than as like unlike despite except
    and or but nor so yet if then else because although though while whereas whether unless once where when
    why how there here not
    be am is are was were been being have has had having do does did doing done
    will would shall should can could may might must ought
    """.split()
)

NUMBER_WORDS = frozenset(
    """
    zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen
    seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred thousand
    million billion trillion
    """.split()
)


@dataclass
class TokenClasses:
    """Token ids of each class (sorted), the special tokens, and whether the vocabulary marks word starts."""

    ids: dict[str, list[int]]
    marks_word_start: bool
    vocab_size: int
    special: list[int]

    def ordinary(self) -> list[int]:
        """Every non-special token id, classified or not."""
        special = set(self.special)
        return [i for i in range(self.vocab_size) if i not in special]

    def counts(self) -> dict[str, int]:
        return {name: len(self.ids[name]) for name in TOKEN_CLASSES}

    def to_dict(self) -> dict:
        return {"counts": self.counts(), "marks_word_start": self.marks_word_start, "vocab_size": self.vocab_size}


def classify_token(text: str, marks_word_start: bool) -> str | None:
    """Class of one token from its decoded ``text`` (e.g. ``" Paris"``), or ``None`` (see the module rules)."""
    word = text.strip()
    if not word or "\ufffd" in word:
        return None
    has_letter = any(ch.isalpha() for ch in word)
    has_digit = any(ch.isdigit() for ch in word)
    if has_digit and not has_letter:
        return "number"
    if not has_letter and not has_digit:
        return "punctuation"
    lower = word.lower()
    if lower in NUMBER_WORDS:
        return "number"
    if marks_word_start and not text[:1].isspace():
        return None  # a piece inside a word, not a word
    if lower in FUNCTION_WORDS:
        return "function_word"
    if not word.isalpha():
        return None
    return "proper_noun" if word[0].isupper() else "common_word"


def marks_word_start(tokenizer) -> bool:
    """Whether the vocabulary spells a word differently at a word start (GPT-2's leading-space tokens)."""
    return tokenizer.encode(" the", add_special_tokens=False) != tokenizer.encode("the", add_special_tokens=False)


def token_classes(tokenizer) -> TokenClasses:
    """Classify every token of ``tokenizer``'s vocabulary (about 0.2 s for GPT-2's 50,257 tokens)."""
    marked = marks_word_start(tokenizer)
    special = set(tokenizer.all_special_ids)
    n = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    ids: dict[str, list[int]] = {name: [] for name in TOKEN_CLASSES}
    for i, piece in enumerate(pieces):
        if i in special or piece is None:
            continue
        # convert_tokens_to_string undoes the byte-level marks ("Ġ" -> " ") and is identity for word-level.
        cls = classify_token(tokenizer.convert_tokens_to_string([piece]), marked)
        if cls is not None:
            ids[cls].append(i)
    return TokenClasses(ids=ids, marks_word_start=marked, vocab_size=n, special=sorted(special))
