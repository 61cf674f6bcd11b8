"""The settings of the cluster that the reliability tests share."""

from __future__ import annotations

# The engine's bounds under test: a small batch and a short waiting queue, so
# that a few hundred concurrent requests overflow it and must be refused.
MAX_NUM_SEQS = 32
MAX_QUEUE_LEN = 96
ENGINE_ARGS = ["--device", "cpu", "--max-num-seqs", str(MAX_NUM_SEQS), "--max-queue-len", str(MAX_QUEUE_LEN)]
ENGINE_ARGS += ["--num-kv-blocks", "512", "--max-model-len", "2048"]
# A 1 MiB body limit, so that the test of an oversized body stays cheap.
GATEWAY_ARGS = ["--shutdown-grace-s", "20", "--reconnect-max-s", "1", "--max-message-bytes", str(1 << 20)]
