"""Structured output on the engine: one xgrammar matcher per constrained
sequence, and the mask of the tokens its grammar allows next.

The tokenizer service compiles a request's constraint and the engine loads
the serialized grammar against a TokenizerInfo of the same tokenizer, built
here from the engine's own model on the first constrained request (the
serialized form leaves the vocabulary out, so it needs one; a grammar
compiled for another tokenizer fails to load and refuses its request).

A matcher follows its sequence's output tokens rather than being told of
each step: before a mask is filled or termination is read, it takes in the
tokens the sequence gained since it last looked, and it rolls back (or
starts over and replays) when the sequence holds fewer. So preemption
(recompute keeps the output tokens), tokens dropped after a stop and
anything else that moves the output leave it in step. Constrained
sequences never speculate, so a step never holds unverified tokens of
theirs.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass, field

import torch
import xgrammar

from pagewire.services.common.config import available_cores
from pagewire.services.common.errors import invalid_argument
from pagewire.services.common.logging import get_logger
from pagewire.services.common.model import load_hf_tokenizer, resolve_model
from pagewire.services.engine.executor.host_copy import to_device

log = get_logger("engine")


@dataclass
class SequenceGrammar:
    matcher: xgrammar.GrammarMatcher
    # The output tokens the matcher has taken in, in order.
    accepted: list[int] = field(default_factory=list)
    # A token the grammar did not allow reached the matcher; the sequence is
    # ended rather than sampled from a mask that allows nothing.
    broken: bool = False

    def _extends_accepted(self, output_token_ids: SequenceOf[int]) -> bool:
        """Whether the output starts with the accepted tokens. A sequence's
        output only grows while it lives (preemption keeps it), so the
        newest accepted token in its place stands for the whole prefix: a
        step costs the same at the thousandth token as at the first."""
        count = len(self.accepted)
        return len(output_token_ids) >= count and (count == 0 or output_token_ids[count - 1] == self.accepted[-1])

    def one_token_ahead(self, output_token_ids: SequenceOf[int]) -> bool:
        """The output is the accepted tokens and one more: a step's usual news."""
        return not self.broken and len(output_token_ids) == len(self.accepted) + 1 and self._extends_accepted(output_token_ids)

    def take(self, token: int, allowed: bool) -> None:
        """The outcome of a token the matcher was given (alone or in a batch)."""
        if allowed:
            self.accepted.append(token)
        else:
            self.broken = True

    def follow(self, output_token_ids: SequenceOf[int]) -> None:
        """Take in the tokens past those accepted, after rewinding to the
        longest prefix the accepted tokens share with the output."""
        if self._extends_accepted(output_token_ids):
            keep = len(self.accepted)
        else:
            pairs = enumerate(zip(self.accepted, output_token_ids))
            keep = next((i for i, (accepted, token) in pairs if accepted != token), min(len(self.accepted), len(output_token_ids)))
        if keep < len(self.accepted):
            self._rewind(keep)
        for token in output_token_ids[len(self.accepted) :]:
            if self.broken:
                return
            self.take(token, not self.matcher.is_terminated() and self.matcher.accept_token(token))

    def _rewind(self, keep: int) -> None:
        """Back to the first `keep` accepted tokens: a rollback when the
        matcher still holds the states, else a reset (follow replays)."""
        drop = len(self.accepted) - keep
        limit = self.matcher.max_rollback_tokens
        if not self.broken and (limit < 0 or drop <= limit):
            self.matcher.rollback(drop)
            del self.accepted[keep:]
        else:
            self.matcher.reset()
            self.accepted = []
        self.broken = False

    @property
    def done(self) -> bool:
        return self.broken or self.matcher.is_terminated()


def grammar_threads() -> int:
    """Half the cores this process may run on. xgrammar's own default
    halves the host's hardware threads, which in a container limited to a
    few cores of a large host starts many more threads than there are cores."""
    return max(1, available_cores() // 2)


@functools.cache
def tokenizer_info(model: str) -> xgrammar.TokenizerInfo:
    """The TokenizerInfo of a --model value, loaded once per process."""
    log.info("loading the tokenizer for structured output", model=model or "embedded default")
    return xgrammar.TokenizerInfo.from_huggingface(load_hf_tokenizer(resolve_model(model)))


class GrammarMatchers:
    """The matchers of the live constrained sequences, by request id; used
    by the step thread only."""

    def __init__(self, model: str, threads: int = 0):
        self._model = model
        self._sequences: dict[str, SequenceGrammar] = {}
        # Takes in a step's tokens and fills its masks on a pool of threads,
        # outside the interpreter lock: each costs tens of microseconds a
        # row, and a step may hold hundreds of rows.
        self._batch = xgrammar.BatchGrammarMatcher(threads or grammar_threads())

    def tokenizer_info(self) -> xgrammar.TokenizerInfo:
        return tokenizer_info(self._model)

    def add(self, request_id: str, compiled_grammar: str, stop_token_ids: SequenceOf[int]) -> None:
        """Load the request's grammar; INVALID_ARGUMENT when it does not load."""
        try:
            grammar = xgrammar.CompiledGrammar.deserialize_json(compiled_grammar, self.tokenizer_info())
        except Exception as exc:  # xgrammar raises its own types and RuntimeError for a malformed text
            raise invalid_argument(
                f"compiled_grammar does not load: {exc}; send the one the tokenizer service compiled for this model", field="compiled_grammar"
            ) from None
        matcher = xgrammar.GrammarMatcher(grammar, override_stop_tokens=sorted(set(stop_token_ids)))
        self._sequences[request_id] = SequenceGrammar(matcher)

    def forget(self, request_id: str) -> None:
        self._sequences.pop(request_id, None)

    def advance(self, rows: list[tuple[str, SequenceOf[int]]]) -> None:
        """follow() for each (request id, output tokens) of a step: the rows one
        token ahead of their matcher (nearly all) in one call on xgrammar's
        threads, accept_token being tens of microseconds a row; the rest one
        by one."""
        batch: list[tuple[SequenceGrammar, int]] = []
        for request_id, output_token_ids in rows:
            state = self._sequences[request_id]
            if state.one_token_ahead(output_token_ids) and not state.matcher.is_terminated():
                batch.append((state, output_token_ids[-1]))
            else:
                state.follow(output_token_ids)
        if batch:
            allowed = self._batch.batch_accept_token([state.matcher for state, _ in batch], [token for _, token in batch])
            for (state, token), ok in zip(batch, allowed):
                state.take(token, ok)

    def terminated(self, request_id: str, output_token_ids: SequenceOf[int]) -> bool:
        """Whether the sequence's grammar has ended (a stop token after a
        complete output, or a token it did not allow)."""
        state = self._sequences[request_id]
        state.follow(output_token_ids)
        if state.broken:
            log.warning("a token outside the grammar reached its matcher; the request ends", request_id=request_id)
        return state.done

    def fill(self, rows: list[tuple[str, SequenceOf[int]]]) -> torch.Tensor:
        """[len(rows), words] int32 bitmask on the host, a row per (request
        id, output tokens): bit t of a row set when token t may come next."""
        bitmask = xgrammar.allocate_token_bitmask(len(rows), self.tokenizer_info().vocab_size)
        self.advance(rows)
        matchers, indices = [], []
        for index, (request_id, _) in enumerate(rows):
            state = self._sequences[request_id]
            if not state.done:
                matchers.append(state.matcher)
                indices.append(index)
        if matchers:
            self._batch.batch_fill_next_token_bitmask(matchers, bitmask, indices)
        return bitmask


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[rows, vocab_size] bool, on the bitmask's device, from xgrammar's
    int32 bitmask: True where bit t of a row is set. Ids past the bitmask
    (a model vocabulary padded beyond the tokenizer's) are False."""
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)
    if allowed.shape[1] >= vocab_size:
        return allowed[:, :vocab_size]
    return torch.nn.functional.pad(allowed, (0, vocab_size - allowed.shape[1]), value=False)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, row_indices: list[int]) -> torch.Tensor:
    """`logits` with every token a row's bitmask leaves out set to -inf, on
    the logits' device; ids past the bitmask (a model vocabulary padded
    beyond the tokenizer's) are left out too. Rows not in row_indices are
    unchanged. A row whose bitmask allows nothing (its grammar has ended) is
    left as it is: the core ends that sequence."""
    device = logits.device
    allowed = allowed_tokens(to_device(bitmask, torch.int32, device), logits.shape[-1])
    allowed |= ~allowed.any(dim=1, keepdim=True)
    if len(row_indices) == logits.shape[0]:
        return logits.masked_fill(~allowed, float("-inf"))
    index = to_device(row_indices, torch.int64, device)
    masked = logits.clone()
    masked[index] = logits[index].masked_fill(~allowed, float("-inf"))
    return masked

