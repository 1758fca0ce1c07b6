"""Turn captions into CLIP token ids: OpenAI CLIP's byte-level BPE tokenizer, standard library only.

A from-scratch re-implementation of openai/CLIP ``clip/simple_tokenizer.py`` (MIT) without the
``regex`` and ``ftfy`` packages. ``\\p{L}``/``\\p{N}`` come from ``unicodedata.category`` and are exact
for every code point Python's Unicode database (14.0 on Python 3.11) knows.

Vocabulary: bpe_simple_vocab_16e6.txt.gz next to this file.
BPE merges from OpenAI CLIP, MIT licence, Copyright (c) 2021 OpenAI;
sha256 924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a.

``ftfy.fix_text`` (version 6.3 defaults) is reproduced only in the parts that are plain character
rules: HTML entities, C1 controls read as Windows-1252, Latin ligatures (ﬁ -> fi), fullwidth/halfwidth forms,
curly quotes (U+02BC, U+2018-U+201B -> ', U+201C-U+201F -> "), ANSI terminal escapes, control
characters, NFC. Where the output can still differ from the reference:
  * mojibake repair (``cafÃ©`` -> ``café``, ``donâ€™t`` -> ``don't``): ftfy's encoding detective;
  * lone or paired UTF-16 surrogates (ftfy's fix_surrogates);
  * characters assigned after Unicode 14 (the ``regex`` package ships newer tables).
"""
import functools
import gzip
import html
import html.entities
import itertools
import re
import sys
import unicodedata
from pathlib import Path

import torch

VOCAB_PATH = Path(__file__).resolve().parent / "bpe_simple_vocab_16e6.txt.gz"

# --- ftfy's character rules, as str.translate tables -------------------------------------------
_C1_AS_CP1252 = {b: bytes([b]).decode("cp1252", errors="ignore") or chr(b) for b in range(0x80, 0xA0)}
_LIGATURES = dict(zip(map(ord, "ĲĳŉǱǲǳǄǅǆǇǈǉǊǋǌﬀﬁﬂﬃﬄﬅﬆ"),
                      "IJ ij ʼn DZ Dz dz DŽ Dž dž LJ Lj lj NJ Nj nj ff fi fl ffi ffl ſt st".split()))
_WIDTH = {0x3000: " ", **{cp: unicodedata.normalize("NFKC", chr(cp)) for cp in range(0xFF01, 0xFFF0)
                          if unicodedata.normalize("NFKC", chr(cp)) != chr(cp)}}
_QUOTES = {**dict.fromkeys([0x02BC, *range(0x2018, 0x201C)], "'"), **dict.fromkeys(range(0x201C, 0x2020), '"')}
_CHARACTER_FIXES = {**_C1_AS_CP1252, **_LIGATURES, **_WIDTH, **_QUOTES}
_CONTROL_CHARS = dict.fromkeys([*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070),
                                0xFEFF, *range(0xFFF9, 0xFFFD)])
_TERMINAL_ESCAPE = re.compile("\x1b\\[((?:\\d|;)*)([a-zA-Z])")
_HTML_ENTITY = re.compile(r"&#?[0-9A-Za-z]{1,24};")


@functools.lru_cache(maxsize=None)
def _named_entities() -> dict[str, str]:
    """ftfy decodes only entities ending in ';', plus all-caps forms of lowercase names (&EACUTE;)."""
    entities = {}
    for name, char in html.entities.html5.items():
        if name.endswith(";"):
            entities["&" + name] = char
            if name == name.lower() and html.unescape("&" + name.upper()) == "&" + name.upper():
                entities["&" + name.upper()] = char.upper()
    return entities


def _unescape_entity(match: re.Match) -> str:
    entity = match.group(0)
    if entity in _named_entities():
        return _named_entities()[entity]
    decoded = html.unescape(entity) if entity.startswith("&#") else entity
    return entity if ";" in decoded else decoded  # a numeric reference must consume its ';'


def _fix_line(line: str, unescape: bool) -> str:
    """One pass of each rule, in ftfy's order, repeated until a pass changes nothing (a ligature can
    yield a quote to uncurl, removing a control character can complete a terminal escape)."""
    while True:
        fixed = _HTML_ENTITY.sub(_unescape_entity, line) if unescape else line
        fixed = _TERMINAL_ESCAPE.sub("", fixed.translate(_CHARACTER_FIXES)).translate(_CONTROL_CHARS)
        fixed = unicodedata.normalize("NFC", fixed)
        if fixed == line:
            return line
        line = fixed


def fix_text(text: str) -> str:
    """ftfy.fix_text's rules that need no guessing. ftfy works line by line and, from the first line
    containing '<' on (it may be real HTML), stops decoding entities."""
    fixed_lines, unescape = [], True
    for line in text.split("\n"):
        unescape = unescape and "<" not in line
        fixed_lines.append(_fix_line(line, unescape))
    return "\n".join(fixed_lines)


# --- the reference's pre-split regex, rebuilt for Python's `re` -----------------------------------
# `regex`'s \s is Unicode White_Space; Python's \s also matches \x1c-\x1f, so list it explicitly.
_WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


def _code_point_ranges(wanted: list[bool]) -> str:
    """Character-class body (``\\Uxxxxxxxx-\\Uyyyyyyyy...``) of the code points flagged in `wanted`."""
    ranges, start = [], None
    for cp, inside in enumerate([*wanted, False]):
        if inside and start is None:
            start = cp
        elif not inside and start is not None:
            ranges.append(f"\\U{start:08x}-\\U{cp - 1:08x}")
            start = None
    return "".join(ranges)


def _ignore_case(literal: str) -> str:
    """`literal` as the reference's re.IGNORECASE matches it: `regex` folds s/S/ſ (U+017F) together."""
    return "".join("[sSſ]" if c == "s" else f"[{c}{c.upper()}]" if c.isalpha() else re.escape(c)
                   for c in literal)


@functools.lru_cache(maxsize=None)
def _pre_split_pattern() -> re.Pattern:
    """`<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+`."""
    categories = [unicodedata.category(chr(cp)) for cp in range(sys.maxunicode + 1)]
    letters = _code_point_ranges([c[0] == "L" for c in categories])
    numbers = _code_point_ranges([c[0] == "N" for c in categories])
    words = ["<|startoftext|>", "<|endoftext|>", "'s", "'t", "'re", "'ve", "'m", "'ll", "'d"]
    # U+0345 (a combining mark) case-folds to the letter ι, so under IGNORECASE `regex` keeps it out of
    # the negated class while [\p{L}] does not take it either: the reference silently drops it.
    return re.compile("|".join(map(_ignore_case, words))
                      + f"|[{letters}]+|[{numbers}]|[^{_WHITESPACE}{letters}{numbers}\u0345]+")


@functools.lru_cache(maxsize=None)
def _whitespace_run() -> re.Pattern:
    return re.compile(f"[{_WHITESPACE}]+")


def clean(text: str) -> str:
    """The reference's basic_clean, whitespace_clean and lowercasing, in that order."""
    text = html.unescape(html.unescape(fix_text(text))).strip()
    return _whitespace_run().sub(" ", text).strip().lower()


def bytes_to_unicode() -> dict[int, str]:
    """A printable character for each of the 256 bytes, so BPE can work on strings: printable
    Latin-1 bytes stand for themselves, the others are shifted to code points from 256 up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(shifted)}}


# A word longer than this (in UTF-8 bytes) is BPE-encoded only as far as the ids a caller needs reach; no word of
# a real caption is this long. The BPE of a word's first L bytes keeps the whole word's tokens up to CUT_MARGIN
# bytes before L (twice the longest token, 32 bytes; an empirical margin: tests/test_tokenizer.py checks it on
# long random words).
LONG_WORD = 256
CUT_MARGIN = 64


class SimpleTokenizer:
    """Text -> BPE ids and back; ids exclude the start/end-of-text tokens (see `tokenize`)."""

    def __init__(self, vocab_path: str | Path = VOCAB_PATH):
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {char: b for b, char in self.byte_encoder.items()}
        # Line 0 is a version header; CLIP uses the first 49152 - 256 - 2 merges.
        lines = gzip.open(vocab_path, "rt", encoding="utf-8").read().split("\n")[1:49152 - 256 - 2 + 1]
        merges = [tuple(line.split()) for line in lines]
        # Vocabulary order fixes the ids: bytes, bytes ending a word, one token per merge, specials.
        vocab = [*self.byte_encoder.values(), *(c + "</w>" for c in self.byte_encoder.values()),
                 *("".join(merge) for merge in merges), "<|startoftext|>", "<|endoftext|>"]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.decoder = dict(enumerate(vocab))
        self.merge_rank = {merge: rank for rank, merge in enumerate(merges)}
        self.sot_token_id = self.encoder["<|startoftext|>"]
        self.eot_token_id = self.encoder["<|endoftext|>"]
        self.vocab_size = len(vocab)
        # Captions repeat a small vocabulary, so remember each pre-split word's ids.
        self.cache = {"<|startoftext|>": (self.sot_token_id,), "<|endoftext|>": (self.eot_token_id,)}

    def bpe(self, word: str, whole: bool = True) -> list[str]:
        """Merge a byte-encoded word's symbols, lowest-ranked pair first, until no known pair is left. The last
        symbol of a `whole` word is marked as its end ("</w>"); the start of a word is not."""
        symbols = [*word[:-1], word[-1] + "</w>"] if whole else list(word)
        while len(symbols) > 1:
            pair = min(zip(symbols, symbols[1:]), key=lambda p: self.merge_rank.get(p, float("inf")))
            if pair not in self.merge_rank:
                break
            merged, i = [], 0
            while i < len(symbols):  # merge every occurrence of the pair, left to right
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def encode(self, text: str, max_ids: int | None = None) -> list[int]:
        """The ids of `text`. With `max_ids`, its first `max_ids` ids only, at a cost bounded by them whatever the
        text's length: words after them are not encoded, and a word longer than LONG_WORD bytes (none of a
        caption's real words) only as far as they reach (`_first_ids_of_long_word`)."""
        ids = []
        for match in _pre_split_pattern().finditer(clean(text)):
            if max_ids is not None and len(ids) >= max_ids:
                break
            raw = match.group().encode("utf-8")
            if max_ids is not None and len(raw) > LONG_WORD:
                ids.extend(self._first_ids_of_long_word(raw, max_ids - len(ids)))
                continue
            word = self._as_symbols(raw)
            if word not in self.cache:
                self.cache[word] = tuple(self.encoder[symbol] for symbol in self.bpe(word))
            ids.extend(self.cache[word])
        return ids if max_ids is None else ids[:max_ids]

    def _first_ids_of_long_word(self, raw: bytes, needed: int) -> list[int]:
        """The first `needed` ids of a long word from the BPE of its start alone, since BPE's cost grows with the
        square of a word's length (a 32,000-letter word: minutes). In practice merges reach only a few symbols
        across a cut, so the tokens that end CUT_MARGIN bytes before it are the whole word's
        (tests/test_tokenizer.py checks this against whole-word BPE); the start doubles until it holds `needed` of
        them."""
        length = LONG_WORD
        while length < len(raw):
            symbols = self.bpe(self._as_symbols(raw[:length]), whole=False)
            ends = itertools.accumulate(len(symbol) for symbol in symbols)  # one character per byte
            kept = [self.encoder[symbol] for symbol, end in zip(symbols, ends) if end <= length - CUT_MARGIN]
            if len(kept) >= needed:
                return kept[:needed]
            length *= 2
        return [self.encoder[symbol] for symbol in self.bpe(self._as_symbols(raw))][:needed]

    def _as_symbols(self, raw: bytes) -> str:
        """UTF-8 bytes as the printable characters BPE works on, one per byte (bytes_to_unicode)."""
        return "".join(self.byte_encoder[b] for b in raw)

    def decode(self, ids) -> str:
        text = "".join(self.decoder[int(i)] for i in ids)
        raw = bytearray(self.byte_decoder[char] for char in text)
        return raw.decode("utf-8", errors="replace").replace("</w>", " ")


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> SimpleTokenizer:
    return SimpleTokenizer()


def tokenize(texts: str | list[str], context_length: int = 77, truncate: bool = True) -> torch.LongTensor:
    """(N, context_length) ids: [SOT] text [EOT], zero-padded. Too long: with `truncate`, cut the
    text's ids and keep EOT as the last token; otherwise raise RuntimeError. Only the ids that can be used are
    computed: BPE's work is bounded by the ids used (a megabyte of words: about 40 ms). Cleaning the text stays
    linear in its length, except for entities nested in one another ("&amp;amp;amp;..."), which ftfy, and so
    this, unescapes one level per pass."""
    tokenizer = default_tokenizer()
    texts = [texts] if isinstance(texts, str) else list(texts)
    rows = []
    for text in texts:
        # Only the first context_length - 2 ids can be used: one more tells a text that is too long.
        ids = [tokenizer.sot_token_id, *tokenizer.encode(text, max_ids=context_length - 1), tokenizer.eot_token_id]
        if len(ids) > context_length:
            if not truncate:
                raise RuntimeError(f"Input {text[:200]!r} is too long for context length {context_length}: more "
                                   f"than {context_length} tokens including start/end of text")
            ids = ids[:context_length - 1] + [tokenizer.eot_token_id]
        rows.append(ids + [0] * (context_length - len(ids)))
    return torch.tensor(rows, dtype=torch.long).reshape(len(texts), context_length)
