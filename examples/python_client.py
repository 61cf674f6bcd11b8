"""Stream one chat completion from a pagewire gateway over gRPC.

    python examples/python_client.py [HOST:PORT]      # default 127.0.0.1:50051

Runs from the repository root (it imports the generated stubs in
services/common/pb); other languages generate theirs from protos/.
"""

import sys
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pagewire.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc  # noqa: E402

target = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051"
with grpc.insecure_channel(target) as channel:
    stub = gateway_pb2_grpc.GenerationStub(channel)
    request = gateway_pb2.GenerateRequest(
        chat=gateway_pb2.ChatInput(messages=[common_pb2.ChatMessage(role="user", content="Name three colours.")]),
        sampling=common_pb2.SamplingParams(temperature=0, max_tokens=32),
    )
    for chunk in stub.Complete(request, timeout=60):
        sys.stdout.write(chunk.text)
        if chunk.finish_reason:
            reason = common_pb2.FinishReason.Name(chunk.finish_reason)
            sys.stdout.write(f"\n[{reason}, {chunk.usage.prompt_tokens} prompt + {chunk.usage.completion_tokens} completion tokens]\n")
