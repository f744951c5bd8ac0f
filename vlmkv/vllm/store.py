"""One attention layer's side of vlmkv's pages in a paged engine: writing new tokens (quantize on write, or stage
a `kivi` block until it is full) and gathering what a step reads. Free of vLLM: both backends (cpu.py, cuda.py)
hold one and differ only in the attention kernel they run."""
from __future__ import annotations

import torch

from .pages import PageFormat
from .plan import StepPlan
from .staging import Staging


class PageStore:
    """fmt: the layer's page format; max_seqs: the most requests a step holds (sizes the staging pool's cap)."""

    def __init__(self, fmt: PageFormat, max_seqs: int):
        self.fmt = fmt
        self.max_seqs = max_seqs
        self.staging: Staging | None = None
        self._release: list[int] = []  # staging slots of blocks the step filled, freed after its attention

    def write(self, key, value, pages, slot_mapping) -> None:
        """key, value `[T, H, d]` (T >= slot_mapping's length; padding past it), slot_mapping long `[T']` (-1:
        padding) into pages uint8 `[B, H, N, C]`."""
        fmt = self.fmt
        n = slot_mapping.shape[0]
        slots = slot_mapping.to(torch.long)
        key, value = key[:n], value[:n]
        keep = slots >= 0
        if not bool(keep.all()):
            slots, key, value = slots[keep], key[keep], value[keep]
        if slots.numel() == 0:
            return
        N = fmt.block_size
        blocks, offs = slots // N, slots % N
        if not fmt.staged:
            pages[blocks, :, offs] = fmt.quantize_tokens(key, value)
            return
        if self.staging is None:
            self.staging = Staging(pages.shape[1], N, fmt.head_dim, key.dtype, key.device, cap=2 * self.max_seqs + 8)
        self.settle()
        self._release = write_blocks(fmt, self.staging, pages, blocks, offs, key, value)

    def settle(self) -> None:
        """Free the staging slots of blocks the last step filled (kept until its attention read them)."""
        for slot in self._release:
            self.staging.release(slot)
        self._release = []

    def decode_view(self, seq_lens, block_table):
        """What a decode step (one query a request, its token already written) reads: (npage long `[R]`, the
        blocks of the table read from the pages; from_pages long `[R]`, the tokens they hold for the request; own,
        for `kivi`, the staged `[R, 2, H, N, d]` of each request's own block, this step's token included, and
        own_len long `[R]` its tokens; for `rtn` None and zeros)."""
        N = self.fmt.block_size
        seq = seq_lens.to(torch.long)
        if not self.fmt.staged:
            npage = -(-seq // N)
            return npage, seq, None, torch.zeros_like(seq)
        npage = (seq - 1) // N  # the blocks before each request's own
        from_pages = npage * N
        own_len = seq - from_pages
        table = block_table.to("cpu", torch.long)
        slots = [self.staging.slot_holding(int(table[r, j]), h)
                 for r, (j, h) in enumerate(zip(npage.tolist(), own_len.tolist()))]
        return npage, from_pages, self.staging.buf[torch.tensor(slots, device=self.staging.buf.device)], own_len

    def scratch(self, plan: StepPlan, pages, key, value, dtype):
        """(keys, values) `[plan.blocks, H, N, d]` in `dtype`: the page blocks dequantized, then (`kivi`) each
        attention request's own block in full precision: its staged tokens, then the step's new ones (`key`,
        `value` `[T, H, d]`, in the step's order)."""
        fmt = self.fmt
        H, N, d = pages.shape[1], fmt.block_size, fmt.head_dim
        k, v = fmt.dequantize_pages(pages[plan.page_blocks.to(pages.device)], dtype)  # [U, H, N, d]
        for j, p in plan.tails:  # past the request's length: whatever the page held
            k[j, :, p:] = 0
            v[j, :, p:] = 0
        if plan.raw:
            P = len(plan.raw)
            rk = torch.zeros(P, H, N, d, dtype=dtype, device=pages.device)
            rv = torch.zeros(P, H, N, d, dtype=dtype, device=pages.device)
            for i, (blk, held, t0, t1) in enumerate(plan.raw):
                if held:
                    st = self.staging.prefix(blk, held)  # [2, H, held, d]
                    rk[i, :, :held], rv[i, :, :held] = st[0], st[1]
                rk[i, :, held:held + t1 - t0] = key[t0:t1].transpose(0, 1)
                rv[i, :, held:held + t1 - t0] = value[t0:t1].transpose(0, 1)
            k, v = torch.cat([k, rk]), torch.cat([v, rv])
        return k, v


def write_blocks(fmt: PageFormat, staging: Staging, pages, blocks, offs, key, value) -> list[int]:
    """Write tokens of staged (`kivi`) formats: `blocks`, `offs` long `[T]` (each block's tokens in consecutive
    slots), key, value `[T, H, d]`. Blocks the write fills are quantized into their pages: straight from the input
    when written whole in one call, else from `staging`, where the others wait. Returns the staging slots of the
    blocks filled, which the caller frees after the step's attention (its queries read their own block from them)."""
    N = fmt.block_size
    staging.begin_step()
    b, o = blocks.tolist(), offs.tolist()
    starts = [i for i in range(len(b)) if i == 0 or b[i] != b[i - 1]] + [len(b)]
    direct, done = [], []  # (block id, token start) quantized from the input; (block id, slot) from staging
    for i0, i1 in zip(starts, starts[1:]):
        blk, o0 = b[i0], o[i0]
        if o[i1 - 1] - o0 != i1 - i0 - 1:
            raise ValueError(f"block {blk}: tokens of one block must be written in consecutive slots, got offsets "
                             f"{o[i0:i1]}")
        if o0 == 0 and i1 - i0 == N:
            direct.append((blk, i0))
            if blk in staging.slot_of:  # a block reopened and now written whole: its old slot is free
                staging.release(staging.slot_of[blk])
            continue
        slot = staging.write(blk, o0, key[i0:i1], value[i0:i1])
        if slot is not None:
            done.append((blk, slot))
    dev = pages.device
    if direct:
        idx = (torch.tensor([i for _, i in direct])[:, None] + torch.arange(N)[None, :]).to(key.device)  # [B, N]
        k = key[idx].permute(0, 2, 1, 3)  # [B, H, N, d]
        v = value[idx].permute(0, 2, 1, 3)
        pages[torch.tensor([blk for blk, _ in direct], device=dev)] = fmt.quantize_blocks(k, v)
    if done:
        buf = staging.buf[torch.tensor([s for _, s in done], device=staging.buf.device)]  # [B, 2, H, N, d]
        pages[torch.tensor([blk for blk, _ in done], device=dev)] = fmt.quantize_blocks(buf[:, 0], buf[:, 1])
    return [s for _, s in done]


__all__ = ["PageStore", "write_blocks"]
