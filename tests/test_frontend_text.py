"""Text frontend pieces beyond the golden cases: tokenizer, number words, split rules, validation."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from engine.api import EngineError
from engine.frontend.number_words import number_to_words
from engine.frontend.text import (TextFrontend, is_only_punctuation, replace_blank, spell_out_number,
                                  split_paragraph, validate_text, zh_post_rules)
from engine.frontend.tokenizer import ADDITIONAL_SPECIAL_TOKENS, CosyVoice2Tokenizer, write_tokenizer_files


@pytest.fixture(scope="module")
def tok() -> CosyVoice2Tokenizer:
    d = write_tokenizer_files(Path(tempfile.mkdtemp()) / "CosyVoice-BlankEN")
    assert sorted(p.name for p in d.iterdir()) == ["merges.txt", "tokenizer_config.json", "vocab.json"]
    return CosyVoice2Tokenizer(d)


def test_tokenizer_ids(tok):
    assert len(tok) == 151663
    assert tok.endofprompt_id == 151646
    assert [tok.special_token_ids[t] for t in ADDITIONAL_SPECIAL_TOKENS] == list(range(151644, 151663))
    # cosyvoice2.md §1.5 example; no BOS/EOS added
    assert tok.encode("The quick brown fox jumps over the lazy dog.") == \
        [785, 3974, 13876, 38835, 34208, 916, 279, 15678, 5562, 13]
    assert tok.encode("你好[laughter]<|endofprompt|>")[-2:] == [151651, 151646]
    assert tok.decode(tok.encode("hello 世界")) == "hello 世界"


def test_tokenizer_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError):
        CosyVoice2Tokenizer(tmp_path)


@pytest.mark.parametrize("digits,words", [
    ("0", "zero"), ("007", "seven"), ("1", "one"), ("13", "thirteen"), ("21", "twenty-one"),
    ("100", "one hundred"), ("101", "one hundred and one"), ("1000", "one thousand"),
    ("1002", "one thousand and two"), ("1021", "one thousand and twenty-one"),
    ("1100", "one thousand, one hundred"), ("1000002", "one million and two"),
    ("1234567", "one million, two hundred and thirty-four thousand, five hundred and sixty-seven"),
    ("2000000", "two million"), ("٣٤", "thirty-four"), ("²", "zero"),
])
def test_number_to_words(digits, words):
    assert number_to_words(digits) == words


def test_spell_out_number():
    assert spell_out_number("I have 2 cats and 13 dogs") == "I have two cats and thirteen dogs"
    assert spell_out_number("v2x10") == "vtwoxten"
    assert spell_out_number("no digits") == "no digits"


def test_split_paragraph_rules():
    en_len = lambda s: len(s.split())  # noqa: E731
    pieces = dict(token_max_n=1, token_min_n=0, merge_len=0)   # no merging: the raw sentences
    assert split_paragraph("Wait... what?!", en_len, "en", **pieces) == ["Wait.", " what?"]
    assert split_paragraph("Wait... what?!", en_len, "en") == ["Wait. what?"]
    assert split_paragraph('He said "hi." Then left', en_len, "en", **pieces) == ['He said "hi."', " Then left."]
    assert split_paragraph("你好。世界", len, "zh") == ["你好。世界。"]
    long = "一二三四五六七八九十" * 7 + "。"          # 71 chars per sentence
    assert split_paragraph(long * 2, len, "zh") == [long, long]
    assert split_paragraph(long + "短句。", len, "zh") == [long + "短句。"]   # tail < 20 merges
    assert split_paragraph("", len, "zh") == []


def test_zh_post_rules():
    assert replace_blank("中 文 a b 中") == "中文a b中"
    assert zh_post_rules("（注意）面积10m²——好，") == "注意面积10m平方 好。"
    assert zh_post_rules("a - b.c`d`") == "a，b。cd"
    assert is_only_punctuation("，。!?…") and is_only_punctuation("") and not is_only_punctuation("a.")


def test_normalize_edges(tok):
    fe = TextFrontend(tok)
    assert fe.normalize("   ", split=True) == [] and fe.normalize("", split=False) == ""
    assert fe.normalize("用四川话说<|endofprompt|>", split=True) == ["用四川话说<|endofprompt|>"]
    raw = TextFrontend(tok, enabled=False)
    assert raw.normalize("It costs $5.", split=False) == "It costs $5."
    assert raw.normalize("It costs $5.", split=True) == ["It costs $5."]
    nowetext = TextFrontend(tok, use_wetext=False)
    assert nowetext.normalize("I have 2 cats", split=False) == "I have two cats"


@pytest.mark.parametrize("text,code", [
    ("", "empty_text"), ("  \n\t ", "empty_text"), (b"\xff\xfe bad", "invalid_text"),
    ("bad \x00 nul", "invalid_text"), ("esc \x1b[0m", "invalid_text"), ("lone \ud800", "invalid_text"),
    (123, "invalid_text"), ("x" * 101, "text_too_long"),
])
def test_validate_text_errors(text, code):
    with pytest.raises(EngineError) as e:
        validate_text(text, max_chars=100)
    assert e.value.code == code


def test_validate_text_ok():
    assert validate_text("你好\n\tworld 👋", 100) == "你好\n\tworld 👋"
    assert validate_text("héllo".encode(), 100) == "héllo"
