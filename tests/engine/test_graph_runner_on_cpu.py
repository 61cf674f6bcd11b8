"""The CUDA graph runner's staging, on the CPU: its graphs replaced by eager
passes over the same static buffers, an engine must generate exactly what
the eager runner generates. Decode steps pad the batch to a graph's size
with rows that write no cache slot and sequences without context; verify
steps pack each sequence's last token and proposals first; prefill and
mixed steps pad their rows to a forward-pass graph's token count and their
sequences to every slot. None of that may change a token."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from pagewire.services.engine.core.engine import EngineCore
from pagewire.services.engine.executor.cuda_graphs import CudaGraphRunner
from tests.engine.util import greedy, make_engine, run_all, tokens_of

MAX_NUM_SEQS = 8
MAX_MODEL_LEN = 256
NUM_SPECULATIVE_TOKENS = 3


@dataclass
class EagerPass:
    """Stands in for a captured graph: replay() runs the forward pass it was made for."""

    forward: Callable[[], None]

    def replay(self) -> None:
        self.forward()


class EagerGraphRunner(CudaGraphRunner):
    def _capture(self) -> None:
        for tokens_per_seq, sizes in self.batch_sizes.items():
            for size in sizes:
                self.graphs[size, tokens_per_seq] = EagerPass(functools.partial(self._forward, size, tokens_per_seq))  # type: ignore[assignment]
        for tokens in self.prefill_tokens:
            self.prefill_graphs[tokens] = EagerPass(functools.partial(self._forward_prefill, tokens))  # type: ignore[assignment]


def engine(engine_model, graphs: bool, speculative: bool, max_num_batched_tokens: int) -> EngineCore:  # type: ignore[no-untyped-def]
    settings = {"speculative_method": "ngram", "num_speculative_tokens": NUM_SPECULATIVE_TOKENS, "ngram_min": 1} if speculative else {}
    core = make_engine(engine_model, max_num_seqs=MAX_NUM_SEQS, max_num_batched_tokens=max_num_batched_tokens, max_model_len=MAX_MODEL_LEN, **settings)
    if graphs:
        executor, eager = core.executor, core.executor.runner
        verify_tokens = 1 + NUM_SPECULATIVE_TOKENS if speculative else 1
        executor.runner = EagerGraphRunner(
            executor.loaded, eager.kv_caches, eager.block_size, eager.sampler, MAX_NUM_SEQS, MAX_MODEL_LEN, None, verify_tokens, max_num_batched_tokens
        )
    return core


@pytest.mark.parametrize(
    "speculative,max_num_batched_tokens", [(False, 48), (True, 48), (False, 600)], ids=["chunks-beside-decodes", "verify-graphs", "whole-prompts"]
)
def test_graph_staging_generates_what_eager_steps_generate(engine_model, prompts, speculative: bool, max_num_batched_tokens: int) -> None:  # type: ignore[no-untyped-def]
    outputs = {}
    for graphs in (False, True):
        core = engine(engine_model, graphs, speculative, max_num_batched_tokens)
        # More requests than slots and prompts of every length: decode batches
        # of several sizes, chunks that start mid-prompt, steps that mix them,
        # and (speculating) prompts that repeat themselves, so that verify
        # steps carry proposals.
        for index, ids in enumerate(prompts * 2):
            prompt = ids[: 5 + 7 * index]
            core.add_request(f"r{index}", prompt + prompt if speculative else prompt, greedy(10))
        outputs[graphs] = {request_id: tokens_of(out) for request_id, out in run_all(core).items()}
        if graphs:
            runner = core.executor.runner
            assert isinstance(runner, EagerGraphRunner) and runner.num_graph_launches > 0 and runner.num_prefill_graph_launches > 0
            assert runner.num_verify_graph_launches > 0 if speculative else runner.num_verify_graph_launches == 0
    assert outputs[True] == outputs[False]
