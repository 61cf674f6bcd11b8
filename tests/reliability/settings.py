"""The settings of the cluster that the reliability tests share."""

from __future__ import annotations

# The engine's bounds under test: a small batch and a short waiting queue, so
# that a few hundred concurrent requests overflow it and must be refused.
MAX_NUM_SEQS = 32
MAX_QUEUE_LEN = 96
# A 1 MiB message limit on every service (and the gateway's REST body
# limit), so that the tests of oversized bodies and messages stay cheap.
MAX_MESSAGE_BYTES = 1 << 20
MESSAGE_LIMIT = ["--max-message-bytes", str(MAX_MESSAGE_BYTES)]
TOKENIZER_ARGS = MESSAGE_LIMIT
ENGINE_ARGS = ["--device", "cpu", "--max-num-seqs", str(MAX_NUM_SEQS), "--max-queue-len", str(MAX_QUEUE_LEN)]
ENGINE_ARGS += ["--num-kv-blocks", "512", "--max-model-len", "2048", *MESSAGE_LIMIT]
GATEWAY_ARGS = ["--shutdown-grace-s", "20", "--reconnect-max-s", "1", *MESSAGE_LIMIT]
