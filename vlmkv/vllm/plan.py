"""What one step of a paged engine reads, for every page format: free of vLLM (plain tensors from its metadata).

`rtn` formats: a query reads every token as stored, its own included, so each request reads the blocks it
references from the pages. `kivi` formats: a query reads the blocks before its own from the pages and its own block
in full precision (the staged tokens of earlier steps, then the step's new ones), as a decoding token does; so the
step's queries split into one attention request per (request, block of queries), all of them sharing the page
blocks. Either way the attention is over "scratch blocks": the distinct page blocks the step references (a block
shared through prefix caching once), then one full-precision block per attention request (`kivi`)."""
from __future__ import annotations

import torch


class StepPlan:
    """seq_lens int `[R]`, query_start_loc int `[R + 1]`, block_table int `[R, M]` (the engine's), block size N.

    page_blocks long `[U]`: the page block ids read, each once; table int32 `[R', M']`: each attention request's
    blocks as scratch indices (page blocks 0 .. U - 1, then raw block U + i for the i-th entry of `raw`);
    seq_lens, query_start_loc int32: the attention requests' (R' = R for `rtn`); raw: (block id, tokens staged
    before the step, first and end index of the step's new tokens) of each attention request's own block (`kivi`);
    tails: (scratch block, valid tokens) of partly filled page blocks (`rtn`), whose rows past them are not
    tokens."""

    def __init__(self, seq_lens, query_start_loc, block_table, N: int, staged: bool):
        seq = seq_lens.to("cpu", torch.long)
        bt = block_table.to("cpu", torch.long)
        R, M = bt.shape
        self.staged = staged
        self.raw: list[tuple[int, int, int, int]] = []
        self.tails: list[tuple[int, int]] = []
        if not staged:
            full = -(-seq // N)
            mask = torch.arange(M)[None, :] < full[:, None]
            self.page_blocks, inv = torch.unique(bt[mask], return_inverse=True)
            table = torch.zeros(R, M, dtype=torch.int32)
            table[mask] = inv.to(torch.int32)
            self.tails = [(int(table[r, int(full[r]) - 1]), p) for r, p in enumerate((seq % N).tolist()) if p]
            self.table = table
            self.seq_lens = seq.to(torch.int32)
            self.query_start_loc = query_start_loc.to("cpu", torch.int32)
            self.blocks = self.page_blocks.numel()
            return
        ends, qsl = seq.tolist(), query_start_loc.to("cpu").tolist()
        before = [(e - 1) // N for e in ends]  # blocks before each request's last query's own block
        mask = torch.arange(M)[None, :] < torch.tensor(before)[:, None]
        self.page_blocks, inv = torch.unique(bt[mask], return_inverse=True)
        U = self.page_blocks.numel()
        pos = torch.zeros(R, M, dtype=torch.long)
        pos[mask] = inv
        rows, lens, starts = [], [], [0]
        for r in range(R):
            e, q0 = ends[r], qsl[r]
            s = e - (qsl[r + 1] - q0)
            for j in range(s // N, (e - 1) // N + 1):
                qs, qe = max(s, j * N), min(e, (j + 1) * N)
                rows.append(pos[r, :j].tolist() + [U + len(self.raw)])
                self.raw.append((int(bt[r, j]), qs - j * N, q0 + qs - s, q0 + qe - s))
                lens.append(qe)
                starts.append(starts[-1] + qe - qs)
        width = max(len(x) for x in rows)
        self.table = torch.tensor([x + [0] * (width - len(x)) for x in rows], dtype=torch.int32)
        self.seq_lens = torch.tensor(lens, dtype=torch.int32)
        self.query_start_loc = torch.tensor(starts, dtype=torch.int32)
        self.blocks = U + len(self.raw)

    @property
    def requests(self) -> int:
        return self.table.shape[0]


__all__ = ["StepPlan"]
