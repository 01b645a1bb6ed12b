"""Incremental detokenization (quasar.engine.detokenizer) on the real SmolLM2 byte-level BPE
tokenizer: streamed pieces never split a character, their concatenation is the full decode, and
stop strings cut the text wherever they fall across tokens."""
import pytest

from quasar.engine.detokenizer import IncrementalDetokenizer

TEXT = "Grüße, 世界! こんにちは 🚀🚀 naïve café — done.\n  indented  spaces"


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    from quasar.engine import load_tokenizer
    return load_tokenizer(smollm2_dir)


@pytest.mark.parametrize("step", [1, 2, 3])
def test_pieces_concatenate_to_the_decode(tok, step):
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in tok.decode(ids[:i]) for i in range(1, len(ids))), "the text must split characters"
    d = IncrementalDetokenizer(tok)
    pieces = []
    for i in range(0, len(ids), step):
        assert not d.add(ids[i:i + step])
        pieces.append(d.delta())
    d.finish()
    pieces.append(d.delta(final=True))
    assert "".join(pieces) == tok.decode(ids) == TEXT
    assert not any("\ufffd" in p for p in pieces)


def test_a_cut_character_is_kept_at_the_end(tok):
    ids = tok("ok 🚀", add_special_tokens=False)["input_ids"][:-1]      # ends inside the emoji
    d = IncrementalDetokenizer(tok)
    d.add(ids)
    d.finish()
    assert d.delta(final=True) == tok.decode(ids) and tok.decode(ids).endswith("\ufffd")


@pytest.mark.parametrize("stop", ["世界", "🚀", "e, 世", "\n  in"])
def test_stop_strings_across_tokens(tok, stop):
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    d = IncrementalDetokenizer(tok, stop=[stop, "never-seen"])
    pieces, hit_at = [], None
    for i, t in enumerate(ids):
        if d.add([t]):
            hit_at = i
            break
        pieces.append(d.delta())
    pieces.append(d.delta(final=True))
    assert d.stopped == stop and hit_at is not None
    assert "".join(pieces) == TEXT[:TEXT.index(stop)]
    assert stop not in "".join(pieces[:-1]) + pieces[-1]
    assert stop in tok.decode(ids[:hit_at + 1]) and stop not in tok.decode(ids[:hit_at])


def test_held_back_text_is_a_possible_stop_prefix(tok):
    ids = tok("abc xyz", add_special_tokens=False)["input_ids"]
    d = IncrementalDetokenizer(tok, stop=["xyz!"])
    out = ""
    for t in ids:
        d.add([t])
        out += d.delta()
    assert out == "abc "                            # len(stop) - 1 = 3 characters held back
    d.finish()
    assert out + d.delta(final=True) == "abc xyz" and d.stopped is None
