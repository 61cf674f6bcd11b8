"""Incremental detokenization against the embedded model's real tokenizer."""

from __future__ import annotations

import copy

import pytest

from pagewire.services.tokenizer.detokenizer import IncrementalDetokenizer, text_decoder

TEXTS = {
    "ascii": "The quick brown fox jumps over the lazy dog. 1234567890!",
    "emoji": "Party 🎉🎉 time 👩‍👩‍👧 done 😀",
    "cjk": "日本語のテキストと中文文本, 한국어 텍스트",
    "byte_fallback": "naïve café — “quotes” ∑∫ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \u0301",
    "special": "before<|im_end|>after<|im_start|>user\nmore",
}


def _stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    pieces = [detok.append([i]).text for i in ids[:-1]]
    pieces.append(detok.append(ids[-1:], last=True).text)
    return pieces


@pytest.mark.parametrize("name", sorted(TEXTS))
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_one_token_at_a_time_reproduces_decode(hf_tokenizer, name: str, skip_special_tokens: bool) -> None:
    ids = hf_tokenizer(TEXTS[name], add_special_tokens=False)["input_ids"]
    pieces = _stream(IncrementalDetokenizer(hf_tokenizer, skip_special_tokens=skip_special_tokens), ids)
    assert "".join(pieces) == hf_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    assert not any("\ufffd" in piece for piece in pieces), "a broken character was emitted"


@pytest.mark.parametrize("clean_up_spaces", [False, True])
def test_text_decoder_equals_transformers_decode(hf_tokenizer, clean_up_spaces: bool) -> None:
    # With clean-up on, the wrapper changes text ("a ." -> "a."), so the
    # direct call must not be taken.
    tokenizer = copy.copy(hf_tokenizer)
    tokenizer.clean_up_tokenization_spaces = clean_up_spaces
    decode = text_decoder(tokenizer)
    for text in [*TEXTS.values(), "a . b , c ! it ' s"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for skip in (True, False):
            assert decode(ids, skip) == tokenizer.decode(ids, skip_special_tokens=skip)


def test_raw_byte_tokens_emit_no_broken_characters(hf_tokenizer) -> None:
    # Byte-level tokens of a 4-byte character, fed one by one, release the
    # character only once all four bytes have arrived.
    ids = hf_tokenizer("😀", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1
    detok = IncrementalDetokenizer(hf_tokenizer)
    assert [detok.append([i]).text for i in ids] == [""] * (len(ids) - 1) + ["😀"]


def test_prompt_tail_keeps_spacing_of_first_output_token(hf_tokenizer) -> None:
    prompt = hf_tokenizer("Hello", add_special_tokens=False)["input_ids"]
    output = hf_tokenizer(" world and more", add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer.with_prompt_tail(hf_tokenizer, prompt)
    assert "".join(_stream(detok, output)) == hf_tokenizer.decode(prompt + output)[len("Hello") :]


def test_stop_string_split_over_several_tokens_is_caught(hf_tokenizer) -> None:
    text = "Counting: one two three STOP_HERE four five"
    ids = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    stop = "STOP_HERE"
    assert len(hf_tokenizer(" " + stop, add_special_tokens=False)["input_ids"]) > 2, "stop string must span tokens"
    detok = IncrementalDetokenizer(hf_tokenizer, stop=[stop, "never"])
    emitted, update = "", None
    for i in ids:
        update = detok.append([i])
        emitted += update.text
        if update.stopped:
            break
    assert update is not None and update.stopped and update.matched_stop == stop
    assert emitted == "Counting: one two three "
    assert detok.append(ids[-2:]).text == "", "tokens after a stop produce nothing"


def test_stop_string_included_when_asked_and_earliest_match_wins(hf_tokenizer) -> None:
    ids = hf_tokenizer("alpha beta gamma", add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(hf_tokenizer, stop=["gamma", "beta"], include_stop_str_in_output=True)
    pieces = []
    for i in ids:
        update = detok.append([i])
        pieces.append(update.text)
        if update.stopped:
            break
    assert "".join(pieces) == "alpha beta" and update.matched_stop == "beta"


def test_text_held_for_a_possible_stop_is_flushed_at_the_end(hf_tokenizer) -> None:
    ids = hf_tokenizer("the end is ST", add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(hf_tokenizer, stop=["STOP"])
    pieces = _stream(detok, ids)
    assert "".join(pieces) == "the end is ST"


@pytest.mark.parametrize("kind", ["skipped-special", "invalid-bytes"])
def test_tokens_without_text_keep_the_decoding_window_short(hf_tokenizer, kind: str) -> None:
    # Taken a token at a time (as stop strings need), a long run of tokens that
    # never completes a character must not decode an ever longer window: the
    # ids decoded per appended token stay bounded, and the text is still that
    # of decoding the whole run.
    # "\u00a2" is the byte-level token of byte 0xA2, a lone UTF-8 continuation byte.
    token = hf_tokenizer.eos_token_id if kind == "skipped-special" else hf_tokenizer.convert_tokens_to_ids("\u00a2")
    detok = IncrementalDetokenizer(hf_tokenizer, stop=["\n\n"])
    decoded_ids = 0
    decode = detok._decode_ids

    def counting(ids: list[int], skip: bool) -> str:
        nonlocal decoded_ids
        decoded_ids += len(ids)
        return decode(ids, skip)

    detok._decode_ids = counting
    run = [token] * 2000
    text = detok.append(run, last=True).text
    assert decoded_ids < 40 * len(run)
    assert text == hf_tokenizer.decode(run, skip_special_tokens=True)
