"""Speculative decoding on the GPU at small batches (512 prompt tokens, 256
output tokens, greedy, EOS ignored): time per output token without
speculation, then with k proposals a step in four runs of the same prompts.

- none-accepted: every proposal is a token the target does not pick (its
  greedy token without speculation plus one), so each step verifies k
  tokens and keeps none.
- all-accepted: every proposal is the target's own greedy continuation, as
  prompt lookup proposes for a prompt that already holds its continuation.
  Random weights seldom repeat themselves, so a prompt cannot be made to
  hold it; the proposer replays it instead. The continuation replayed is the
  none-accepted run's, which the verify steps computed: in bf16 a verify
  step's k + 1 rows round differently from a decode step's one, and random
  weights leave the top logits so close that the plain run's continuation
  parts from the verified one within a few tokens (then nothing more is
  accepted). Each record states its accepted tokens.
- ngram: prompt lookup itself on the random prompts (it finds little).
- draft: --draft-shape's random model (llama-1b's for llama-8b: one
  vocabulary) drafting; random weights accept almost nothing, so the record
  states what the draft costs: its time a step (catch-up and k greedy passes)
  as a fraction of a step without speculation.

Warm-ups use prompts of their own (no prefix-cache hits in the measured
runs; each record states them). Prints one JSON line per shape, batch and run.

    python -m benchmarks.spec_decode [--shapes llama-8b] [--batches 1] [--num-speculative-tokens 4] [--draft-shape llama-1b]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable

import torch

from benchmarks import hf_peer
from benchmarks.throughput import SHAPES, emit, engine_config, free_gpu, measured_engine, random_model, run_engine
from pagewire.services.common.logging import configure_logging
from pagewire.services.engine.config import EngineConfig
from pagewire.services.engine.core.engine import EngineCore
from pagewire.services.engine.core.proposer import ProposalRequest
from pagewire.services.engine.executor.loader import LoadedModel
from pagewire.services.engine.executor.model_executor import ModelExecutor


@dataclasses.dataclass
class ReplayingProposer:
    """Proposes each prompt's known greedy continuation, or with `wrong`, each
    of its tokens plus one; for prompts it does not know (warm-ups), the last
    token k times, so the warm-up also runs verify steps."""

    continuations: dict[tuple[int, ...], list[int]]  # prompt -> prompt and greedy output
    prompt_len: int
    k: int
    vocab_size: int
    wrong: bool

    def propose_all(self, requests: list[ProposalRequest]) -> dict[str, list[int]]:
        proposals = {}
        for request in requests:
            limit = min(self.k, request.max_tokens)
            known = self.continuations.get(tuple(request.token_ids[: self.prompt_len]))
            if known is None:
                proposals[request.request_id] = request.token_ids[-1:] * limit
                continue
            ahead = known[len(request.token_ids) : len(request.token_ids) + limit]
            proposals[request.request_id] = [(t + 1) % self.vocab_size for t in ahead] if self.wrong else ahead
        return {request_id: ids for request_id, ids in proposals.items() if ids}


class TimedProposer:
    """Wraps a proposer and adds up the seconds its proposals take (a draft
    model's proposals are read back, so the time includes its device work)."""

    def __init__(self, propose_all: Callable[[list[ProposalRequest]], dict[str, list[int]]]):
        self._propose_all = propose_all
        self.seconds = 0.0
        self.calls = 0

    def propose_all(self, requests: list[ProposalRequest]) -> dict[str, list[int]]:
        start = time.perf_counter()
        proposals = self._propose_all(requests)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return proposals


class RandomDraftExecutor(ModelExecutor):
    """The executor with a random-weight draft model of the given shape built
    on the device, as the benchmark builds its target (no checkpoint to write)."""

    def __init__(self, config: EngineConfig, loaded: LoadedModel, draft_shape: str):
        self._draft_shape = draft_shape
        super().__init__(config, loaded)

    def _load_draft(self, config: EngineConfig, loaded: LoadedModel) -> LoadedModel:
        return random_model(self._draft_shape, loaded.dtype, config.max_model_len or 0, loaded.device)


def measure(core: EngineCore, warm: list[list[int]], measured: list[list[int]], output_len: int, outputs: dict[str, list[int]] | None = None) -> dict:
    if warm:
        run_engine(core, warm, 8)
    before = core.stats()
    result = run_engine(core, measured, output_len, outputs=outputs)
    after = core.stats()
    return dict(
        **result,
        proposed_tokens=after.spec_decode_draft_tokens_total - before.spec_decode_draft_tokens_total,
        accepted_tokens=after.spec_decode_accepted_tokens_total - before.spec_decode_accepted_tokens_total,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="llama-8b")
    parser.add_argument("--batches", default="1")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--num-speculative-tokens", type=int, default=4)
    parser.add_argument("--draft-shape", default="llama-1b", help="the draft model's shape; empty: no draft run")
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    configure_logging("warning")
    batches = [int(b) for b in args.batches.split(",")]
    # The CPU runs it too, at small shapes, to check the benchmark itself.
    on_gpu = torch.cuda.is_available()
    args.device, args.max_num_seqs, k = "cuda" if on_gpu else "cpu", max(batches), args.num_speculative_tokens
    device_name = torch.cuda.get_device_name() if on_gpu else "cpu"
    for shape in args.shapes.split(","):
        vocab = SHAPES[shape]["vocab_size"]
        plain_config = engine_config(args)
        loaded = random_model(shape, getattr(torch, plain_config.dtype), plain_config.max_model_len, torch.device(args.device))
        for batch in batches:
            warm = hf_peer.prompts(batch, args.prompt_len, vocab, seed=300 + batch)
            measured = hf_peer.prompts(batch, args.prompt_len, vocab, seed=400 + batch)
            assert not {tuple(p) for p in warm} & {tuple(p) for p in measured}
            common = dict(bench="spec_decode", shape=shape, batch=batch, prompt_len=args.prompt_len, output_len=args.output_len,
                          device=device_name, num_speculative_tokens=k, async_scheduling=args.async_scheduling)  # fmt: skip

            outputs: dict[str, list[int]] = {}
            core = measured_engine(plain_config, loaded)
            plain = measure(core, warm, measured, args.output_len, outputs)
            del core
            free_gpu()
            emit(dict(common, run="plain", **plain))
            continuations = {tuple(p): p + outputs[f"r{i}"] for i, p in enumerate(measured)}

            speculating = dataclasses.replace(plain_config, speculative_method="ngram", num_speculative_tokens=k, ngram_min=1)
            for run in ("none-accepted", "all-accepted", "ngram"):
                core = measured_engine(speculating, loaded)
                if run != "ngram":
                    core.proposer = ReplayingProposer(continuations, args.prompt_len, k, vocab, wrong=run == "none-accepted")
                verified: dict[str, list[int]] = {}
                result = measure(core, warm, measured, args.output_len, verified)
                if run == "none-accepted":
                    continuations = {tuple(p): p + verified[f"r{i}"] for i, p in enumerate(measured)}
                del core
                free_gpu()
                emit(dict(common, run=run, **result, speedup_over_plain=round(plain["tpot_p50_ms"] / result["tpot_p50_ms"], 2)))

            if args.draft_shape:
                drafting = dataclasses.replace(plain_config, speculative_method="draft", draft_model=f"random-{args.draft_shape}", num_speculative_tokens=k)
                core = EngineCore(drafting, RandomDraftExecutor(drafting, loaded, args.draft_shape))
                run_engine(core, warm, 8)  # before the timer: the draft's warm-up proposals are not counted
                timed = core.proposer = TimedProposer(core.proposer.propose_all)
                result = measure(core, [], measured, args.output_len)
                del core
                free_gpu()
                draft_ms = timed.seconds / max(1, timed.calls) * 1e3
                emit(dict(common, run="draft", draft_shape=args.draft_shape, **result,
                          speedup_over_plain=round(plain["tpot_p50_ms"] / result["tpot_p50_ms"], 2),
                          draft_ms_per_step=round(draft_ms, 3), draft_cost_over_plain_step=round(draft_ms / plain["tpot_p50_ms"], 2)))  # fmt: skip
        del loaded
        free_gpu()


if __name__ == "__main__":
    main()
