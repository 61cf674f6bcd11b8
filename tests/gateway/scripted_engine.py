"""A scripted engine replica for gateway tests that need what a real engine
cannot give cheaply: being killed and restarted several times within a test,
exact control over step timing, and a record of every Add and Abort the
gateway sent. It speaks the real Engine proto on a real port; its "model"
emits the prompt's own token ids in a loop, one per step.
"""

from __future__ import annotations

import argparse
import asyncio
import math
from dataclasses import dataclass, field

import grpc

from pagewire.services.common.grpc_utils import RunningServer, error_status, start_server
from pagewire.v1 import common_pb2, engine_pb2, engine_pb2_grpc

SERVICE_NAME = "pagewire.v1.Engine"
BLOCK_SIZE = 16
VOCAB_SIZE = 49152


@dataclass
class ScriptedSequence:
    request_id: str
    prompt: list[int]
    max_tokens: int
    output: list[int] = field(default_factory=list)

    @property
    def blocks(self) -> int:
        return math.ceil((len(self.prompt) + len(self.output)) / BLOCK_SIZE)


@dataclass
class EngineRecord:
    added: list[str] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)


class ScriptedEngine(engine_pb2_grpc.EngineServicer):
    def __init__(self, model_id: str, step_s: float, max_model_len: int = 256, num_blocks: int = 64):
        self.model_id = model_id
        self.step_s = step_s
        self.max_model_len = max_model_len
        self.num_blocks = num_blocks
        self.running: dict[str, ScriptedSequence] = {}
        self.record = EngineRecord()
        self.finished = 0
        self.open_streams = 0
        # Tokens each running request gets per step (a speculative engine
        # sends several in one update).
        self.tokens_per_step = 1

    def load(self) -> engine_pb2.EngineLoad:
        used = sum(seq.blocks for seq in self.running.values())
        return engine_pb2.EngineLoad(num_running=len(self.running), kv_cache_usage=used / self.num_blocks)

    async def Generate(self, request_iterator, context):  # type: ignore[no-untyped-def]
        mine: set[str] = set()
        pending: list[engine_pb2.SequenceUpdate] = []

        async def read() -> None:
            async for message in request_iterator:
                for add in message.add:
                    self.record.added.append(add.request_id)
                    # Refused at admission, as the real engine refuses them.
                    refusal = "prompt too long" if len(add.prompt_token_ids) >= self.max_model_len else None
                    if max(add.prompt_token_ids, default=0) >= VOCAB_SIZE:
                        refusal = f"prompt token ids must be below the vocabulary size {VOCAB_SIZE}"
                    if refusal is not None:
                        error = error_status(grpc.StatusCode.INVALID_ARGUMENT, refusal)
                        pending.append(engine_pb2.SequenceUpdate(request_id=add.request_id, finish_reason=common_pb2.FINISH_REASON_ERROR, error=error))
                        continue
                    max_tokens = add.sampling.max_tokens if add.sampling.HasField("max_tokens") else 16
                    self.running[add.request_id] = ScriptedSequence(add.request_id, list(add.prompt_token_ids), max_tokens)
                    mine.add(add.request_id)
                for request_id in message.abort:
                    self.record.aborted.append(request_id)
                    self.running.pop(request_id, None)
                    mine.discard(request_id)

        reader = asyncio.ensure_future(read())
        self.open_streams += 1
        try:
            while not reader.done() or mine or pending:
                await asyncio.sleep(self.step_s)
                updates, pending[:] = list(pending), []
                for request_id in list(mine):
                    seq = self.running[request_id]
                    tokens = [seq.prompt[(len(seq.output) + i) % len(seq.prompt)] for i in range(min(self.tokens_per_step, seq.max_tokens - len(seq.output)))]
                    seq.output.extend(tokens)
                    update = engine_pb2.SequenceUpdate(request_id=request_id, token_ids=tokens)
                    if len(seq.output) == len(tokens):
                        update.num_prompt_tokens = len(seq.prompt)
                        update.queue_time_s = 0.0
                    if len(seq.output) >= seq.max_tokens:
                        update.finish_reason = common_pb2.FINISH_REASON_LENGTH
                        del self.running[request_id]
                        mine.discard(request_id)
                        self.finished += 1
                    updates.append(update)
                if updates:
                    yield engine_pb2.EngineStep(updates=updates, load=self.load())
            reader.result()
        finally:
            self.open_streams -= 1
            reader.cancel()
            for request_id in mine:
                self.running.pop(request_id, None)

    async def Info(self, request, context):  # type: ignore[no-untyped-def]
        return engine_pb2.EngineInfo(
            model_id=self.model_id, max_model_len=self.max_model_len, block_size=BLOCK_SIZE, num_kv_blocks=self.num_blocks, vocab_size=VOCAB_SIZE, device="cpu"
        )

    async def Stats(self, request, context):  # type: ignore[no-untyped-def]
        used = sum(seq.blocks for seq in self.running.values())
        return engine_pb2.EngineStats(
            load=self.load(),
            num_total_blocks=self.num_blocks,
            num_free_blocks=self.num_blocks - used,
            prefix_cache_queried_tokens=100,
            prefix_cache_hit_tokens=25,
            requests_finished_total=self.finished,
        )


async def start_scripted_engine(engine: ScriptedEngine, port: int, host: str = "127.0.0.1") -> RunningServer:
    running = await start_server(
        host, port, 1 << 22, [lambda server: engine_pb2_grpc.add_EngineServicer_to_server(engine, server)], [SERVICE_NAME]
    )
    await running.set_serving(True)
    return running


async def serve_until_killed(host: str, port: int, step_s: float) -> None:
    # Room for any benchmark's workload: no prompt is too long, no KV cache runs out.
    engine = ScriptedEngine("scripted", step_s, max_model_len=4096, num_blocks=1 << 20)
    running = await start_scripted_engine(engine, port, host)
    await running.server.wait_for_termination()


if __name__ == "__main__":
    # A process of its own that stands in for `pagewire engine`
    # (benchmarks/gateway_overhead.py), with the same --host and --port.
    parser = argparse.ArgumentParser(description="A scripted engine serving on its own")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--step-s", type=float, required=True, help="seconds per step: one token for every running request")
    args = parser.parse_args()
    asyncio.run(serve_until_killed(args.host, args.port, args.step_s))
