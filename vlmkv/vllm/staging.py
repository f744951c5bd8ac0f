"""Where a block waits until it is full: full-precision room for formats whose key groups span a whole block.

A paged cache fills each block from its first slot to its last, and only full blocks are ever shared (prefix
caching) or reused as they are. So the tokens of a block not yet full belong to one request, and the block id
names them: `Staging` keeps, per layer, a few slots of `[2, H, N, d]` (keys, values) in the model's dtype and a
map block id -> slot. A write at a block's slot 0 opens (or reopens) its slot; a write that fills the block hands
the block to the caller to quantize; the caller frees the slot once the step's attention has read it (a query
attends to its own block in full precision).

A finished request's last block may never be filled: its slot is reclaimed when the block is reopened, or, when
every slot is taken, the slot written longest ago is reused. A read of a block whose slot was taken from it
raises (never a silent wrong answer); below its cap the pool grows instead of reclaiming a slot.
"""
from __future__ import annotations

import torch


class StagingError(RuntimeError):
    """A block's waiting tokens are not where the cache expects them (a write out of order, or a lost slot)."""


class Staging:
    """Full-precision room for blocks not yet full, of one layer.

    heads, block_size, head_dim: the page geometry; dtype, device: the model's. The pool starts at `slots` and
    doubles on demand up to `cap` (twice the requests a step may hold: at most one block a request is partly
    filled, so at the cap at least half the slots hold blocks of finished requests)."""

    def __init__(self, heads: int, block_size: int, head_dim: int, dtype: torch.dtype, device, slots: int = 8,
                 cap: int = 512):
        self.cap = max(cap, slots)
        self.shape = (heads, block_size, head_dim)
        self.N = block_size
        self.buf = torch.zeros(slots, 2, heads, block_size, head_dim, dtype=dtype, device=device)
        self.slot_of: dict[int, int] = {}  # block id -> slot
        self.block_of: list[int | None] = [None] * slots
        self.fill: list[int] = [0] * slots
        self.touched: list[int] = [0] * slots  # the step that last wrote each slot
        self.step = 0

    @property
    def slots(self) -> int:
        return self.buf.shape[0]

    def nbytes(self) -> int:
        return self.buf.numel() * self.buf.element_size()

    def _grow(self) -> None:
        n = self.slots
        self.buf = torch.cat([self.buf, torch.zeros_like(self.buf)], 0)
        self.block_of += [None] * n
        self.fill += [0] * n
        self.touched += [0] * n

    def _open(self, block: int) -> int:
        slot = self.slot_of.get(block)
        if slot is None:
            free = [i for i, b in enumerate(self.block_of) if b is None]
            if not free:
                # every slot holds a block: below the cap, grow; at it, reuse the slot written longest ago (a
                # finished request's, unless a running one waited longer than all of those: its read then raises)
                old = min(range(self.slots), key=self.touched.__getitem__)
                if self.slots < self.cap or self.touched[old] == self.step:
                    self._grow()
                    return self._open(block)
                del self.slot_of[self.block_of[old]]
                free = [old]
            slot = free[0]
            self.slot_of[block] = slot
            self.block_of[slot] = block
        self.buf[slot].zero_()  # positions beyond what is written are read by nothing, but never hold stale NaN
        self.fill[slot] = 0
        return slot

    def begin_step(self) -> None:
        self.step += 1

    def write(self, block: int, start: int, key: torch.Tensor, value: torch.Tensor) -> int | None:
        """Write tokens [start, start + t) of `block`: key, value `[t, H, d]`. Returns the slot when that fills the
        block (the caller quantizes `self.buf[slot]` and calls `release`), else None."""
        t = key.shape[0]
        if start == 0:
            slot = self._open(block)
        else:
            slot = self.slot_of.get(block)
            if slot is None:
                raise StagingError(f"block {block}: a write at slot {start} but the block's first {start} tokens are "
                                   f"not staged (its staging slot was reclaimed, or the block was never opened)")
            if start > self.fill[slot]:
                raise StagingError(f"block {block}: a write at slot {start} leaves a gap after the "
                                   f"{self.fill[slot]} tokens staged")
        self.buf[slot, 0, :, start:start + t] = key.transpose(0, 1).to(self.buf.dtype)
        self.buf[slot, 1, :, start:start + t] = value.transpose(0, 1).to(self.buf.dtype)
        self.fill[slot] = start + t  # a write below the fill (a rollback) drops what followed it
        self.touched[slot] = self.step
        return slot if start + t == self.N else None

    def release(self, slot: int) -> None:
        block = self.block_of[slot]
        if block is not None:
            del self.slot_of[block]
        self.block_of[slot] = None
        self.fill[slot] = 0

    def slot_holding(self, block: int, n: int) -> int:
        """The slot of `block`; StagingError unless it holds at least its first `n` tokens."""
        self.prefix(block, n)
        return self.slot_of[block]

    def prefix(self, block: int, n: int) -> torch.Tensor:
        """The first `n` staged tokens of `block`, `[2, H, n, d]` (a view); StagingError unless at least `n` are
        held."""
        slot = self.slot_of.get(block)
        if slot is None or self.fill[slot] < n:
            held = "nothing" if slot is None else f"{self.fill[slot]} tokens"
            raise StagingError(f"block {block}: attention needs its first {n} tokens from staging, which holds {held} "
                               f"(a slot reclaimed while its request was still running: more requests than slots "
                               f"were waiting on partly filled blocks)")
        return self.buf[slot, :, :, :n]


__all__ = ["Staging", "StagingError"]
