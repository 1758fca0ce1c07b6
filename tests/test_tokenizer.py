"""tokenizer.py against golden outputs of OpenAI's reference CLIP tokenizer (ftfy + regex), and the bound on a long
caption's work (the start of a long word against whole-word BPE)."""
import json
import random
from pathlib import Path

import pytest
import torch

import tokenizer
from tokenizer import SimpleTokenizer, tokenize

CASES = json.loads((Path(__file__).parent / "fixtures" / "tokenizer_cases.json").read_text(encoding="utf-8"))
# The only fixture cases whose reference output needs ftfy's mojibake detective (see tokenizer.py).
KNOWN_FTFY_DIFFERENCES = {"mojibake: cafÃ© and donâ€™t"}
REPRODUCIBLE = [case for case in CASES["cases"] if case["text"] not in KNOWN_FTFY_DIFFERENCES]


@pytest.fixture(scope="module")
def tok() -> SimpleTokenizer:
    return tokenizer.default_tokenizer()


def test_fixture_is_what_we_expect():
    assert (CASES["sot"], CASES["eot"]) == (49406, 49407)
    assert KNOWN_FTFY_DIFFERENCES <= {case["text"] for case in CASES["cases"] if case["ftfy_changes"]}
    assert sum(case["ftfy_changes"] for case in REPRODUCIBLE) >= 3  # curly quotes, width/ligature, NFC


@pytest.mark.parametrize("case", REPRODUCIBLE, ids=lambda case: repr(case["text"][:40]))
def test_matches_reference(tok, case):
    assert tok.encode(case["text"]) == case["ids"]
    assert tokenize(case["text"])[0].tolist() == case["tokens77"]
    assert tok.decode(case["ids"]) == case["decoded"]


@pytest.mark.parametrize("text", sorted(KNOWN_FTFY_DIFFERENCES))
def test_known_differences_still_differ(tok, text):
    """If one of these starts matching, move it out of KNOWN_FTFY_DIFFERENCES."""
    case = next(case for case in CASES["cases"] if case["text"] == text)
    assert tok.encode(text) != case["ids"]


def test_special_ids_and_vocab_size(tok):
    assert (tok.sot_token_id, tok.eot_token_id, tok.vocab_size) == (49406, 49407, 49408)


def test_batch_shape_dtype_and_padding():
    ids = tokenize(["a man is playing a guitar", ""], context_length=16)
    assert ids.shape == (2, 16) and ids.dtype == torch.long
    assert ids[1].tolist() == [49406, 49407] + [0] * 14
    assert tokenize("").tolist() == [[49406, 49407] + [0] * 75]


def test_other_context_lengths_truncate_keeping_eot(tok):
    text = "word " * 100
    for length in (5, 32, 100):
        row = tokenize(text, context_length=length)[0].tolist()
        body = tok.encode(text)[: length - 2]
        assert row[: len(body) + 2] == [49406, *body, 49407] and len(row) == length


def test_too_long_without_truncate_raises():
    with pytest.raises(RuntimeError, match="too long for context length 8"):
        tokenize("one two three four five six seven eight nine", context_length=8, truncate=False)
    assert tokenize("one two", context_length=8, truncate=False).shape == (1, 8)


def test_non_latin_letters_and_digits(tok):
    words = tokenizer._pre_split_pattern().findall(tokenizer.clean("Москва 東京 ελληνικά 2023 ²½"))
    assert words == ["москва", "東京", "ελληνικά", "2", "0", "2", "3", "²", "½"]
    assert tok.decode(tok.encode("Москва 東京 2023")) == "москва 東京 2 0 2 3 "


def test_standard_library_ftfy_rules():
    assert tokenizer.clean("don’t “quote” ＡＢＣ ﬁne e\u0301 \x93hi\x94 &rsquo; \x1b[31mred\x01") == \
        "don't \"quote\" abc fine é \"hi\" ' red"
    assert tokenizer.clean("&rsquo;\n<b>&rsquo;") == "' <b>’"  # ftfy leaves entities alone after a '<'


def test_ignorecase_contractions_and_dropped_u0345():
    split = tokenizer._pre_split_pattern().findall
    assert split("it's it'ſ 'll") == ["it", "'s", "it", "'ſ", "'ll"]
    assert split("a\u0345b") == ["a", "b"]


def test_optional_cross_check_with_regex_package():
    """Where the `regex` package is installed, compare the pre-split on every code point."""
    regex = pytest.importorskip("regex", reason="the cross-check needs the regex package: pip install regex runs it")
    import unicodedata
    reference = regex.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"
                              r"[^\s\p{L}\p{N}]+", regex.IGNORECASE)
    mine = tokenizer._pre_split_pattern()
    chars = [chr(cp) for cp in range(0x30000) if unicodedata.category(chr(cp)) not in ("Cn", "Cs")]
    text = "".join(f"a{c}{c}1{c}'{c}" for c in chars)
    assert mine.findall(text) == reference.findall(text)


def test_bpe_results_are_cached_per_word(tok):
    ids = tok.encode("a completely unseen wordzzz")
    assert "wordzzz" in tok.cache  # ASCII words are their own byte encoding
    assert tok.encode("a completely unseen wordzzz") == ids


def test_decode_roundtrip_and_invalid_utf8(tok):
    assert tok.decode(tok.encode("Hello, World!")) == "hello , world ! "
    lone_lead_byte = tok.byte_encoder[0xC3]  # starts a 2-byte UTF-8 sequence that never comes
    assert tok.decode([tok.encoder[lone_lead_byte]]) == "\ufffd"


def random_word(alphabet: str, length: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(alphabet) for _ in range(length))


@pytest.mark.parametrize("alphabet", ["abcdefghijklmnopqrstuvwxyz", "etaoinshrdlu" * 4 + "cmfwypvbgkjqxz",
                                      "".join(map(chr, range(0x4E00, 0x4F00))), "😍😂👍🔥",
                                      "!?.,;:-_()[]*&^%$#@"],
                         ids=["letters", "english letters", "CJK", "emoji", "punctuation"])
def test_a_long_word_gives_the_first_ids_of_its_whole_word_bpe(tok, alphabet):
    """Only the start of a word over LONG_WORD bytes is encoded: its first ids are those of the whole word."""
    for seed in range(2):
        raw = random_word(alphabet, 900, seed).encode("utf-8")[:900]
        whole = [tok.encoder[symbol] for symbol in tok.bpe("".join(tok.byte_encoder[b] for b in raw))]
        assert tok._first_ids_of_long_word(raw, 75) == whole[:75]


def test_the_work_of_a_long_caption_is_bounded(tok, monkeypatch):
    """A 1 MB one-word caption and a 120 KB caption: BPE sees a few KB, however long the text."""
    seen = []
    real_bpe = tok.bpe
    monkeypatch.setattr(tok, "bpe", lambda word, whole=True: seen.append(len(word)) or real_bpe(word, whole))
    monkeypatch.setattr(tok, "cache", dict(tok.cache))
    one_word = random_word("abcdefghijklmnopqrstuvwxyz", 1_000_000, 0)
    row = tokenize(one_word)[0].tolist()
    assert row[0] == 49406 and row[-1] == 49407 and 0 not in row  # 75 ids of the word
    assert 0 < sum(seen) <= 16 * tokenizer.LONG_WORD  # 0 would mean the patch was not reached
    seen.clear()
    words = " ".join(random_word("abcdefghijklmnopqrstuvwxyz", 6, seed) for seed in range(17_000))
    assert len(words) > 100_000
    row = tokenize(words)[0].tolist()
    assert 0 < len(seen) <= 76  # the words after the 76 ids a caption can use are never encoded
    assert row[1:-1] == tok.encode(" ".join(words.split()[:80]))[:75]
