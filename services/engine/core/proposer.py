"""N-gram prompt lookup: speculative proposals without a draft model. The
last n tokens of a sequence (prompt and output so far) are looked up earlier
in the same sequence; the tokens that followed the newest earlier match are
proposed as its continuation. Text that quotes or edits what the prompt
already holds (code edits, answers citing a passage, summaries) continues
such matches for many tokens, and then one target pass verifies several."""

from __future__ import annotations

from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class ProposalRequest:
    request_id: str
    token_ids: list[int]  # the prompt and the output so far
    max_tokens: int  # the most proposals the request's length limit leaves room for


class Proposer(Protocol):
    """Where a step's speculative tokens come from: prompt lookup here, or a
    draft model in the executor (the core holds no model)."""

    def propose_all(self, requests: list[ProposalRequest]) -> dict[str, list[int]]:
        """Proposals by request id; a request without any is left out."""


@dataclass(frozen=True)
class NgramProposer:
    num_speculative_tokens: int
    ngram_min: int
    ngram_max: int

    def __post_init__(self) -> None:
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"--ngram-min must be at least 1 and at most --ngram-max ({self.ngram_max}), got {self.ngram_min}")
        if self.num_speculative_tokens < 1:
            raise ValueError(f"--num-speculative-tokens must be at least 1, got {self.num_speculative_tokens}")

    def propose_all(self, requests: list[ProposalRequest]) -> dict[str, list[int]]:
        return {r.request_id: drafts for r in requests if (drafts := self.propose(r.token_ids, r.max_tokens))}

    def propose(self, token_ids: SequenceOf[int], max_tokens: int) -> list[int]:
        """At most min(max_tokens, num_speculative_tokens) ids that followed
        the newest earlier occurrence of the longest matching suffix of
        token_ids (ngram_max down to ngram_min tokens); empty when none does."""
        limit = min(max_tokens, self.num_speculative_tokens)
        total = len(token_ids)
        if limit <= 0:
            return []
        for n in range(min(self.ngram_max, total - 1), self.ngram_min - 1, -1):
            suffix = list(token_ids[total - n :])
            last = suffix[-1]
            # Newest first: recent context predicts the continuation best.
            for end in range(total - 2, n - 2, -1):
                if token_ids[end] == last and list(token_ids[end - n + 1 : end + 1]) == suffix:
                    return list(token_ids[end + 1 : end + 1 + limit])
        return []
