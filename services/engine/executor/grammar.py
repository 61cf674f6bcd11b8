"""Structured output on the engine: one xgrammar matcher per constrained
sequence, and the mask of the tokens its grammar allows next.

The tokenizer service compiles a request's constraint and the engine loads
the serialized grammar against a TokenizerInfo of the same tokenizer, built
from the engine's own model on the first constrained request (the
serialized form leaves the vocabulary out, so it needs one; a grammar
compiled for another tokenizer fails to load and refuses its request).

The matchers live in shards (GrammarShard), each in a worker process or in
the step thread (executor/grammar_workers.py spreads the sequences over
them). A matcher follows its sequence's output tokens rather than being
told of each step: before its mask is filled it takes in the tokens the
sequence gained since it last looked, and it rolls back (or starts over
and replays) when the sequence holds fewer. So preemption (recompute keeps
the output tokens), tokens dropped after a stop and anything else that
moves the output leave it in step. Constrained sequences never speculate,
so a step never holds unverified tokens of theirs.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass, field

import torch
import xgrammar

from pagewire.kernels import cuda_token_bitmask
from pagewire.services.common.errors import invalid_argument
from pagewire.services.common.logging import get_logger
from pagewire.services.common.model import load_hf_tokenizer, resolve_model
from pagewire.services.engine.executor.host_copy import to_device

log = get_logger("engine")

# Serialized grammars a process keeps loaded (GrammarLoader).
LOADED_GRAMMARS_KEPT = 32


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
            if not self.matcher.is_terminated() and self.matcher.accept_token(token):
                self.accepted.append(token)
            else:
                self.broken = True

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


@functools.cache
def tokenizer_info(model: str) -> xgrammar.TokenizerInfo:
    """The TokenizerInfo of a --model value, loaded once per process."""
    log.info("loading the tokenizer for structured output", model=model or "embedded default")
    return xgrammar.TokenizerInfo.from_huggingface(load_hf_tokenizer(resolve_model(model)))


class GrammarLoader:
    """Serialized grammars as CompiledGrammar objects, the most recent kept:
    a server's requests mostly share a few schemas, and loading one costs a
    millisecond that the step thread would otherwise pay per request."""

    def __init__(self, info: xgrammar.TokenizerInfo, kept: int = LOADED_GRAMMARS_KEPT):
        self.info = info
        self.load = functools.lru_cache(maxsize=kept)(self._load)

    def _load(self, compiled_grammar: str) -> xgrammar.CompiledGrammar:
        """INVALID_ARGUMENT when the text does not load."""
        try:
            return xgrammar.CompiledGrammar.deserialize_json(compiled_grammar, self.info)
        except Exception as exc:  # xgrammar raises its own types and RuntimeError for a malformed text
            raise invalid_argument(
                f"compiled_grammar does not load: {exc}; send the one the tokenizer service compiled for this model", field="compiled_grammar"
            ) from None


# A constrained row of a step, as its shard receives it: (request id, keep,
# new tokens, bitmask row). The sequence's output is its first `keep` tokens
# as last sent plus the new ones, and its next-token mask goes to that row of
# the bitmask. A plain tuple: a step sends hundreds, and a tuple pickles
# several times faster than a dataclass.
ShardRow = tuple[str, int, list[int], int]


class GrammarShard:
    """The matchers of some of the constrained sequences, in a worker process
    or in the step thread, and the masks of their rows in a bitmask that the
    engine reads."""

    def __init__(self, loader: GrammarLoader, bitmask: torch.Tensor):
        self._loader = loader
        self._bitmask = bitmask
        self._sequences: dict[str, SequenceGrammar] = {}
        self._outputs: dict[str, list[int]] = {}
        self._stop_rows: dict[str, torch.Tensor] = {}

    def add(self, request_id: str, compiled_grammar: str, stop_token_ids: SequenceOf[int]) -> None:
        stops = sorted(set(stop_token_ids))
        self._sequences[request_id] = SequenceGrammar(xgrammar.GrammarMatcher(self._loader.load(compiled_grammar), override_stop_tokens=stops))
        self._outputs[request_id] = []
        self._stop_rows[request_id] = token_row(stops, self._bitmask.shape[1])

    def forget(self, request_id: str) -> None:
        self._sequences.pop(request_id, None)
        self._outputs.pop(request_id, None)
        self._stop_rows.pop(request_id, None)

    def step(self, rows: list[ShardRow]) -> None:
        """Bring each row's matcher to its output and write its next-token mask.
        A grammar that has ended (or been broken by a token it did not allow)
        leaves only its stop tokens, so the core ends the sequence with the
        next one rather than sampling it unconstrained."""
        for request_id, keep, new_tokens, row in rows:
            output = self._outputs[request_id]
            del output[keep:]
            output.extend(new_tokens)
            state = self._sequences[request_id]
            state.follow(output)
            if state.done:
                if state.broken:
                    log.warning("a token outside the grammar reached its matcher; the request ends", request_id=request_id)
                self._bitmask[row] = self._stop_rows[request_id]
            else:
                state.matcher.fill_next_token_bitmask(self._bitmask, row)

    def state(self, request_id: str) -> SequenceGrammar:
        return self._sequences[request_id]


def token_row(token_ids: SequenceOf[int], words: int) -> torch.Tensor:
    """A bitmask row (int32 words, bit t of word t // 32) allowing exactly token_ids."""
    row = [0] * words
    for token in token_ids:
        if token < words * 32:
            row[token >> 5] |= 1 << (token & 31)
    return torch.tensor([word - (1 << 32) if word >= 1 << 31 else word for word in row], dtype=torch.int32)


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
    """`logits` with every token a row's bitmask leaves out set to -inf, in
    place (the mask's i-th row masks row row_indices[i]); ids past the
    bitmask (a model vocabulary padded beyond the tokenizer's) are left out
    too. A row whose bitmask allows nothing (its grammar has ended) is left
    as it is: the core ends that sequence. On a GPU one kernel
    (kernels/token_bitmask.cu) does it; this is its reference."""
    device = logits.device
    if device.type == "cuda":
        # Masked rows that are the step's first, in order (as when every row is constrained), need no index list.
        rows = None if row_indices == list(range(len(row_indices))) else to_device(row_indices, torch.int64, device)
        cuda_token_bitmask.apply_token_bitmask(logits, to_device(bitmask, torch.int32, device), rows)
        return logits
    allowed = allowed_tokens(bitmask, logits.shape[-1])
    allowed |= ~allowed.any(dim=1, keepdim=True)
    if len(row_indices) == logits.shape[0]:
        return logits.masked_fill_(~allowed, float("-inf"))
    index = torch.tensor(row_indices, dtype=torch.int64)
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))
    return logits
