"""Incremental detokenization of one request's output, with stop strings.

Per-token decoding breaks text: a character split over several byte-level
tokens decodes to U+FFFD until its last byte arrives. So text is decoded over
a short window of tokens and released only once the window's decoding no
longer ends in U+FFFD; the released pieces then concatenate to exactly what
decoding the whole sequence gives.

Stop strings can span tokens, so the last (longest stop - 1) characters of
released text are held back until more text shows whether a stop string
starts there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

REPLACEMENT_CHAR = "\ufffd"
# A character spans at most 4 byte-level tokens, so a window holding more
# unreleased tokens than this is not waiting for a character to complete:
# its tokens decode to nothing (skipped special tokens) or to invalid bytes.
# Releasing it then keeps each decode a few tokens long; otherwise a stream
# of such tokens, taken one at a time for stop strings, decodes an ever
# longer window and costs quadratic time.
MAX_UNRELEASED_TOKENS = 8

Decode = Callable[[list[int], bool], str]


def text_decoder(tokenizer: Any) -> Decode:
    """`tokenizer.decode(ids, skip_special_tokens=...)`, calling the Rust
    tokenizer directly when transformers' wrapper adds nothing to it (no
    clean-up of tokenization spaces): a third of the cost per call, and the
    detokenizer decodes twice per request and step."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return lambda ids, skip: backend.decode(ids, skip_special_tokens=skip)
    return lambda ids, skip: tokenizer.decode(ids, skip_special_tokens=skip)


@dataclass
class TextUpdate:
    text: str
    stopped: bool = False
    matched_stop: str = ""
    # Output tokens taken in so far; after a stop match, up to and including
    # the one that completed the stop string (later ones are dropped).
    num_tokens: int = 0


@dataclass
class IncrementalDetokenizer:
    tokenizer: Any
    stop: list[str] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # ids[:prefix_offset] are fully released; ids[prefix_offset:read_offset]
    # decode to text already released, and give the next window its context.
    ids: list[int] = field(default_factory=list)
    prefix_offset: int = 0
    read_offset: int = 0
    held_text: str = ""
    stopped: bool = False
    num_output_tokens: int = 0

    def __post_init__(self) -> None:
        self._decode_ids = text_decoder(self.tokenizer)

    @classmethod
    def with_prompt_tail(cls, tokenizer: Any, prompt_tail_ids: list[int], **options: Any) -> IncrementalDetokenizer:
        """Start with the prompt's last ids as context, so the first output
        token decodes with the spacing it has after the prompt."""
        tail = list(prompt_tail_ids)
        return cls(tokenizer, ids=tail, prefix_offset=0, read_offset=len(tail), **options)

    def _decode(self, ids: list[int]) -> str:
        return self._decode_ids(ids, self.skip_special_tokens)

    def append(self, token_ids: list[int], last: bool = False) -> TextUpdate:
        """Add output tokens; return the text that became stable. With `last`,
        everything left is flushed."""
        if self.stopped:
            return TextUpdate("", stopped=True, num_tokens=self.num_output_tokens)
        if not self.stop or len(token_ids) <= 1:
            return self._append(token_ids, last)
        # One token at a time, so that a stop match counts no token past the
        # one that completed it, however many came in one append.
        texts = []
        for at, token_id in enumerate(token_ids):
            update = self._append([token_id], last and at == len(token_ids) - 1)
            texts.append(update.text)
            if update.stopped:
                break
        update.text = "".join(texts)
        return update

    def _append(self, token_ids: list[int], last: bool) -> TextUpdate:
        self.num_output_tokens += len(token_ids)
        self.ids.extend(token_ids)
        released_before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        window_text = self._decode(self.ids[self.prefix_offset :])
        new_text = ""
        completed = len(window_text) > len(released_before) and not window_text.endswith(REPLACEMENT_CHAR)
        if last or completed or len(self.ids) - self.read_offset > MAX_UNRELEASED_TOKENS:
            new_text = window_text[len(released_before) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        update = self._release(self.held_text + new_text, last)
        update.num_tokens = self.num_output_tokens
        return update

    def _release(self, pending: str, last: bool) -> TextUpdate:
        match_at, matched = self._find_stop(pending)
        if matched:
            self.stopped = True
            self.held_text = ""
            end = match_at + (len(matched) if self.include_stop_str_in_output else 0)
            return TextUpdate(pending[:end], stopped=True, matched_stop=matched)
        hold = 0 if last or not self.stop else min(len(pending), max(len(s) for s in self.stop) - 1)
        self.held_text = pending[len(pending) - hold :] if hold else ""
        return TextUpdate(pending[: len(pending) - hold])

    def _find_stop(self, text: str) -> tuple[int, str]:
        """Earliest stop string in text (the longest one on a tie)."""
        best_at, best = -1, ""
        for candidate in self.stop:
            at = text.find(candidate)
            if at >= 0 and (best_at < 0 or at < best_at or (at == best_at and len(candidate) > len(best))):
                best_at, best = at, candidate
        return best_at, best
