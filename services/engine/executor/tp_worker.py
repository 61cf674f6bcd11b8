"""A tensor-parallel worker: one rank other than 0, started by rank 0
(tensor_parallel.py) with its settings pickled on stdin. It loads its shard
of the model, allocates its share of the KV cache (its heads, rank 0's
number of blocks) and runs each step rank 0 plans, until rank 0 sends None
or goes away.

    python -m pagewire.services.engine.executor.tp_worker < (config, rank, address)
"""

from __future__ import annotations

import pickle
import signal
import sys

import torch

from pagewire.services.common.logging import configure_logging, get_logger
from pagewire.services.engine.config import EngineConfig
from pagewire.services.engine.executor import parallel
from pagewire.services.engine.executor.kv_tensors import allocate_kv_tensors
from pagewire.services.engine.executor.loader import resolve_device
from pagewire.services.engine.executor.model_executor import kv_cache_dtype, load_engine_model, make_runner
from pagewire.services.engine.executor.tensor_parallel import Mirrors, ReceivingSampler

log = get_logger("engine")


def main() -> int:
    # Ctrl-C reaches the whole process group; rank 0 decides when the workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    config, rank, address = pickle.load(sys.stdin.buffer)
    assert isinstance(config, EngineConfig)
    configure_logging(config.log_level, config.log_format, service="engine")
    device = resolve_device(config.device)
    if device.type == "cuda":
        device = torch.device("cuda", rank)
    parallel.initialize(rank, config.tensor_parallel_size, address, device)
    loaded = load_engine_model(config)
    num_blocks, max_model_len = parallel.broadcast_object()
    c = loaded.config
    kv_caches = allocate_kv_tensors(c.num_layers, num_blocks, config.block_size, c.num_kv_heads, c.head_dim, kv_cache_dtype(config, loaded), loaded.device)
    runner = make_runner(config, loaded, kv_caches, ReceivingSampler(loaded.device), max_model_len)
    parallel.gather_objects(parallel.weight_bytes(loaded.model))
    log.info("tensor-parallel rank ready", rank=rank, num_kv_blocks=num_blocks)
    mirrors = Mirrors()
    while (plan := parallel.broadcast_object()) is not None:
        launched = runner.launch(mirrors.scheduled(plan))
        # Rank 0 may queue a constrained step's sampling later, but the ids
        # arrive in the same order on the stream, so a worker waits for none.
        if launched is not None:
            launched.complete()
    parallel.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
