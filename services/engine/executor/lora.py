"""The adapters an engine serves: every adapter loaded (--lora, or at run
time) is held in host memory; --max-loras of them at a time sit in the
device slots of the model's LoRA projections, swapped in least recently
used first. The scheduler keeps the adapters of one step within the slot
count, so a step's adapters are always resident together."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from pagewire.services.common.errors import invalid_argument
from pagewire.services.common.logging import get_logger
from pagewire.services.engine.executor.layers.lora import LoraContext, LoraLinear
from pagewire.services.engine.executor.lora_adapter import LoraAdapter
from pagewire.services.engine.executor.models.llama import MLP

log = get_logger("engine")

# The slot index of a token that uses no adapter.
NO_SLOT = -1


def _projections(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, list[int]]]:
    """(module path, parent, attribute, row counts of its parts) of every
    projection an adapter may target; a mixture of experts keeps its MLP
    unadapted."""
    for index, layer in enumerate(model.model.layers):
        attn, prefix = layer.self_attn, f"model.layers.{index}"
        yield f"{prefix}.self_attn.qkv_proj", attn, "qkv_proj", [attn.q_size, attn.kv_size, attn.kv_size]
        yield f"{prefix}.self_attn.o_proj", attn, "o_proj", [attn.o_proj.weight.shape[0]]
        if isinstance(layer.mlp, MLP):
            rows = layer.mlp.gate_up_proj.weight.shape[0]
            yield f"{prefix}.mlp.gate_up_proj", layer.mlp, "gate_up_proj", [rows // 2, rows // 2]
            yield f"{prefix}.mlp.down_proj", layer.mlp, "down_proj", [layer.mlp.down_proj.weight.shape[0]]


class LoraSlots:
    """Wraps the model's projections in LoraLinear (at start-up, before the
    KV cache is sized, so the slots' memory is accounted for)."""

    def __init__(self, model: nn.Module, max_loras: int, max_rank: int, dtype: torch.dtype, device: torch.device, kernel: str = "auto"):
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.dtype = dtype
        self.pin = device.type == "cuda"
        self.context = LoraContext(max_loras, max_rank, device, kernel)
        self.layers: dict[str, LoraLinear] = {}
        for path, parent, attribute, part_sizes in _projections(model):
            base = getattr(parent, attribute)
            layer = LoraLinear(base, base.weight.shape[1], part_sizes, max_rank, self.context, dtype, device)
            setattr(parent, attribute, layer)
            self.layers[path] = layer
        self.adapters: dict[str, LoraAdapter] = {}
        # Adapter name -> its slot, least recently used first.
        self.resident: OrderedDict[str, int] = OrderedDict()
        self.free_slots = list(range(max_loras - 1, -1, -1))

    def prepare(self, adapter: LoraAdapter) -> LoraAdapter:
        """The read adapter checked against the model's projections (RequestError
        when it does not fit) and, for a GPU, in pinned memory, so that swapping
        it in copies asynchronously. Touches no slot: any thread may call it."""
        for path, parts in adapter.parts.items():
            layer = self.layers.get(path)
            if layer is None:
                raise invalid_argument(f"LoRA adapter {adapter.name!r} targets {path}, which this model has not (or cannot adapt)", "lora_path")
            for part in parts:
                expected_b = (layer.part_sizes[part.part], adapter.rank)
                if tuple(part.a.shape) != (adapter.rank, layer.input_size) or tuple(part.b.shape) != expected_b:
                    raise invalid_argument(
                        f"LoRA adapter {adapter.name!r} does not fit this model at {path}: lora_A {tuple(part.a.shape)} and lora_B "
                        f"{tuple(part.b.shape)}, expected {(adapter.rank, layer.input_size)} and {expected_b}",
                        "lora_path",
                    )
        if not self.pin:
            return adapter
        return LoraAdapter(adapter.name, adapter.path, adapter.rank, {
            path: [type(p)(p.part, p.a.pin_memory(), p.b.pin_memory()) for p in parts] for path, parts in adapter.parts.items()
        })  # fmt: skip

    def add(self, adapter: LoraAdapter) -> None:
        """Hold a prepared adapter in host memory, replacing one of the same name."""
        self.remove(adapter.name)
        self.adapters[adapter.name] = adapter
        log.info("LoRA adapter loaded", name=adapter.name, path=adapter.path, rank=adapter.rank, modules=len(adapter.parts))

    def remove(self, name: str) -> None:
        """Forget an adapter, freeing its slot; the caller makes sure no running sequence uses it."""
        self.adapters.pop(name, None)
        slot = self.resident.pop(name, None)
        if slot is not None:
            for layer in self.layers.values():
                layer.clear_slot(slot)
            self.free_slots.append(slot)

    def slots_for(self, names: Iterable[str]) -> dict[str, int]:
        """The slot of each adapter named (NO_SLOT for ""), swapping in those
        not resident over the least recently used others."""
        wanted = dict.fromkeys(name for name in names if name)
        if len(wanted) > self.max_loras:
            raise RuntimeError(f"a step uses {len(wanted)} LoRA adapters but only {self.max_loras} slots exist (--max-loras)")
        for name in wanted:
            if name in self.resident:
                self.resident.move_to_end(name)
            else:
                self._swap_in(name, wanted)
        return {"": NO_SLOT} | {name: self.resident[name] for name in wanted}

    def _swap_in(self, name: str, keep: dict[str, None]) -> None:
        if self.free_slots:
            slot = self.free_slots.pop()
        else:
            evicted = next(resident for resident in self.resident if resident not in keep)
            slot = self.resident.pop(evicted)
        for layer in self.layers.values():
            layer.clear_slot(slot)
        for path, parts in self.adapters[name].parts.items():
            for part in parts:
                self.layers[path].set_part(slot, part.part, part.a, part.b)
        self.resident[name] = slot
