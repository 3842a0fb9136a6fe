"""Token display strings of the open_clip adapter: word pieces of one word are UTF-8-decoded jointly.

Byte-level BPE splits the UTF-8 bytes of emoji and CJK characters over several tokens; each token
must read as the characters its bytes complete (never U+FFFD), and a word's token strings must
concatenate to the word's text.
"""
import warnings

import pytest

SOT, EOT = "<start_of_text>", "<end_of_text>"


def _row(tb, i=0):
    """Token strings of row i up to and including its end-of-text token."""
    return tb.tokens[i][:int(tb.eot[i]) + 1]


def _words(adapter, tb, i=0):
    """The word-token strings of row i grouped into words (a word ends at a '</w>' token)."""
    ids = tb.ids[i].tolist()
    words, cur = [], ""
    for j in range(1, int(tb.eot[i])):
        cur += tb.tokens[i][j]
        if adapter._decoder[ids[j]].endswith("</w>"):
            words.append(cur)
            cur = ""
    if cur:
        words.append(cur)
    return words


def test_ascii_strings_unchanged(tiny_adapter):
    tb = tiny_adapter.tokenize(["a red circle", "A big BLUE square on the left of the picture", "green"])
    assert _row(tb, 0) == [SOT, "a", "red", "circle", EOT]
    assert _row(tb, 1) == [SOT, "a", "big", "blue", "square", "on", "the", "left", "of", "the", "picture", EOT]
    assert _row(tb, 2) == [SOT, "green", EOT]
    for i in range(3):
        assert len(tb.tokens[i]) == tb.ids.shape[1]
        assert all(s == "" for s in tb.tokens[i][int(tb.eot[i]) + 1:])
        # the special tokens keep their strings
        assert tb.tokens[i][0] == SOT and tb.tokens[i][int(tb.eot[i])] == EOT


def test_ascii_multi_piece_word_concatenates(tiny_adapter):
    # a rare word split into several pieces still reads piece by piece, as before
    tb = tiny_adapter.tokenize(["zxqvbnmkw"])
    row = _row(tb)
    assert len(row) > 3
    assert all(s and s.isascii() for s in row[1:-1])
    assert "".join(row[1:-1]) == "zxqvbnmkw"


@pytest.mark.parametrize("caption", [
    "a 🐶 dog 😀😀 ok",
    "a 🦩🪐 bird",
    "Flamingo 🦩 and 🫠 face",
])
def test_emoji_caption_reads(tiny_adapter, caption):
    tb = tiny_adapter.tokenize([caption])
    row = _row(tb)
    assert row[0] == SOT and row[-1] == EOT
    assert not any("\ufffd" in s for s in tb.tokens[0])
    assert "".join(row[1:-1]) == "".join(caption.lower().split())
    assert _words(tiny_adapter, tb) == caption.lower().split()


@pytest.mark.parametrize("caption", [
    "一只猫在桌子上",
    "我喜欢吃苹果 和 香蕉",
    "東京タワー",
])
def test_cjk_caption_reads(tiny_adapter, caption):
    tb = tiny_adapter.tokenize([caption])
    row = _row(tb)
    assert row[0] == SOT and row[-1] == EOT
    assert len(tb.tokens[0]) == tb.ids.shape[1]
    assert not any("\ufffd" in s for s in tb.tokens[0])
    assert "".join(row[1:-1]) == caption.replace(" ", "")
    assert _words(tiny_adapter, tb) == caption.split()
    # every character shows up whole in exactly one token
    chars = [s for s in row[1:-1] if s]
    assert "".join(chars) == caption.replace(" ", "")


def test_split_character_partial_tokens_are_empty(tiny_adapter):
    a = tiny_adapter
    tb = a.tokenize(["🦩", "🫠", "一只"])
    # the flamingo's 4 UTF-8 bytes span 2 tokens, the melting face's span 3: leading pieces read ''
    assert _row(tb, 0) == [SOT, "", "🦩", EOT]
    assert _row(tb, 1) == [SOT, "", "", "🫠", EOT]
    row = _row(tb, 2)
    assert "".join(row[1:-1]) == "一只"
    assert len(row) > 4                                 # 2 characters over more than 2 tokens
    assert row[1:-1].count("") == len(row) - 4          # each character completed by exactly one token
    assert [s for s in row[1:-1] if s] == ["一", "只"]
    # decoded alone, those partial tokens would not be readable
    assert "\ufffd" in a._token_string(int(tb.ids[0, 1]))


def test_mixed_batch_rows_independent(tiny_adapter):
    tb = tiny_adapter.tokenize(["a red circle", "東京タワー", "a 🦩🪐 bird"])
    assert _row(tb, 0) == [SOT, "a", "red", "circle", EOT]
    assert "".join(_row(tb, 1)[1:-1]) == "東京タワー"
    assert "".join(_row(tb, 2)[1:-1]) == "a🦩🪐bird"
    assert all(len(r) == tb.ids.shape[1] for r in tb.tokens)


def test_truncated_cjk_caption_has_no_replacement_char(tiny_adapter):
    caption = " ".join(["一只猫在桌子上"] * 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tb = tiny_adapter.tokenize([caption])
    assert tb.truncated == [True]
    row = _row(tb)
    assert row[0] == SOT and row[-1] == EOT
    assert not any("\ufffd" in s for s in tb.tokens[0])
    text = "".join(row[1:-1])
    assert text and caption.replace(" ", "").startswith(text)
