"""The slot KV cache: one preallocated pool holding every session's KV, one fixed-size slot per session.

k / v [layers, slots + 1, Hkv, max_seq, D]: slot s of layer n is k[n, s] ([Hkv, max_seq, D], contiguous), the
shape the batch-1 kernels read, so a session's own prefill and batch-1 steps run on its slot unchanged
(`slot_cache(s)`), while a batched step reads every row's slot through a row -> slot index on the device. The last
slot is scratch: padded rows of a batched step write their K/V there and nothing reads it. Slot-contiguous instead
of paged because SpeechGPT's context is only 2048 positions and voice sessions grow toward it (docs/batching.md).
"""

from __future__ import annotations

import threading

import torch

from kernels.checkpoint import LlamaArch
from kernels.model import KVCache

__all__ = ["SlotKVCache", "slots_that_fit"]


def slots_that_fit(arch: LlamaArch, max_seq: int, dtype: torch.dtype, device: torch.device | str,
                   memory_fraction: float = 0.9) -> int:
    """How many sessions' slots fit in `memory_fraction` of the device's free memory now (the scratch slot counted)."""
    per_slot = 2 * arch.num_layers * arch.num_kv_heads * max_seq * arch.head_dim * torch.empty((), dtype=dtype).element_size()
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return max(0, int(free * memory_fraction) // per_slot - 1)


class SlotKVCache:
    def __init__(self, arch: LlamaArch, slots: int, max_seq: int, dtype: torch.dtype, device: torch.device | str):
        if slots < 1:
            raise ValueError(f"SlotKVCache: need at least one slot, got {slots}")
        shape = (arch.num_layers, slots + 1, arch.num_kv_heads, max_seq, arch.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.slots = slots
        self.max_seq = max_seq
        self.scratch_slot = slots
        self._free = list(range(slots - 1, -1, -1))  # pop() hands out slot 0 first
        self._lock = threading.Lock()

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def allocate(self) -> int | None:
        """A free slot's index, or None when every slot is in use."""
        with self._lock:
            return self._free.pop() if self._free else None

    def release(self, slot: int) -> None:
        with self._lock:
            if not 0 <= slot < self.slots or slot in self._free:
                raise ValueError(f"SlotKVCache.release: slot {slot} is not allocated")
            self._free.append(slot)

    def slot_cache(self, slot: int) -> KVCache:
        """Slot `slot` as a batch-1 cache ([layers, Hkv, max_seq, D] views, no copy)."""
        if not 0 <= slot <= self.slots:
            raise ValueError(f"SlotKVCache: slot {slot} out of range [0, {self.slots}]")
        return KVCache.over(self.k[:, slot], self.v[:, slot])

    def nbytes_per_slot(self) -> int:
        return 2 * self.k[:, 0].numel() * self.k.element_size()
