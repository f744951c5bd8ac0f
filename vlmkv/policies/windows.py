"""WindowQuant's pieces, free of model access: windows of visual tokens, similarity to the text prompt,
and the bit-width search under a budget (see docs/WINDOWQUANT.md for the reasons behind each choice).

Shapes: keys `[B, H, S, D]` (after RoPE, possibly Hadamard-rotated: both scorers are rotation-invariant),
token_types / frame_ids `[B, S]` as in `PrefillContext`.
"""
from __future__ import annotations

import math

import torch

from .base import IMAGE, PAD

SCORERS = ("key_cosine", "key_attention", "random")


def window_ids(token_types: torch.Tensor, frame_ids: torch.Tensor | None, window_size: int | None) -> torch.Tensor:
    """long `[B, S]`: window index of every visual token (0, 1, ... per row), -1 elsewhere.

    window_size None: one window per image / video frame (frame-aligned). An int N: consecutive runs of
    N visual tokens, restarted at every image/frame boundary so that no window crosses one.
    """
    B, S = token_types.shape
    vis = token_types == IMAGE
    frames = frame_ids if frame_ids is not None else torch.zeros(B, S, dtype=torch.long, device=token_types.device)
    out = torch.full((B, S), -1, dtype=torch.long, device=token_types.device)
    for b in range(B):
        pos = vis[b].nonzero().flatten()
        if len(pos) == 0:
            continue
        f = frames[b, pos]
        if window_size is None:
            key = f
        else:
            # index within its frame: position among that frame's visual tokens
            new_frame = torch.ones_like(f, dtype=torch.bool)
            new_frame[1:] = f[1:] != f[:-1]
            start = torch.cummax(torch.where(new_frame, torch.arange(len(f), device=f.device), 0), 0).values
            within = torch.arange(len(f), device=f.device) - start
            key = f * (S + 1) + within // window_size
        _, out[b, pos] = torch.unique_consecutive(key, return_inverse=True)
    return out


def prompt_mask(token_types: torch.Tensor) -> torch.Tensor:
    """bool `[B, S]`: the text prompt windows are compared with: the non-padding, non-visual tokens after
    the last visual token of the row (the question); all text tokens for a row whose visual tokens come last."""
    B, S = token_types.shape
    vis = token_types == IMAGE
    text = (token_types != IMAGE) & (token_types != PAD)
    idx = torch.arange(S, device=token_types.device).expand(B, S)
    last_vis = torch.where(vis, idx, -1).amax(dim=1, keepdim=True)
    after = text & (idx > last_vis)
    none_after = ~after.any(dim=1, keepdim=True)
    return torch.where(none_after, text, after)


def token_scores(keys: torch.Tensor, prompt: torch.Tensor, visual: torch.Tensor, scorer: str) -> torch.Tensor:
    """float `[B, S]`: similarity of every visual token to the prompt (0 elsewhere).

    key_cosine:    cos(k_t, mean prompt key), per kv head, averaged over heads.
    key_attention: softmax attention over the visual tokens with the prompt's keys as queries
                   (k_p . k_t / sqrt(D)), averaged over prompt tokens and heads, times the number of
                   visual tokens (so 1.0 means "average share").
    random:        a control for ablations: uniform noise from a fixed seed, unrelated to the prompt.
    """
    if scorer not in SCORERS:
        raise ValueError(f"scorer must be one of {SCORERS}, got {scorer!r}")
    B, H, S, D = keys.shape
    k = keys.float()
    out = torch.zeros(B, S, device=keys.device)
    for b in range(B):
        p, v = prompt[b], visual[b]
        if not p.any() or not v.any():
            continue
        kp, kv = k[b][:, p], k[b][:, v]  # [H, P, D], [H, V, D]
        if scorer == "random":
            g = torch.Generator().manual_seed(int(v.sum()) + b)
            s = torch.rand(int(v.sum()), generator=g).to(keys.device)
        elif scorer == "key_cosine":
            s = torch.nn.functional.cosine_similarity(kv, kp.mean(1, keepdim=True), dim=-1).mean(0)
        else:
            att = torch.softmax(kp @ kv.transpose(1, 2) / math.sqrt(D), dim=-1)  # [H, P, V]
            s = att.mean((0, 1)) * kv.shape[1]
        out[b, v] = s
    return out


def window_scores(tok_scores: torch.Tensor, win: torch.Tensor) -> list[torch.Tensor]:
    """Per row, float `[W]`: the mean token score of each window."""
    res = []
    for b in range(win.shape[0]):
        w = win[b]
        n = int(w.max()) + 1 if (w >= 0).any() else 0
        if n == 0:
            res.append(torch.zeros(0, device=win.device))
            continue
        m = w >= 0
        sums = torch.zeros(n, device=win.device).index_add_(0, w[m], tok_scores[b, m].float())
        cnt = torch.zeros(n, device=win.device).index_add_(0, w[m], torch.ones_like(tok_scores[b, m]).float())
        res.append(sums / cnt)
    return res


def bits_cost(bits: int, group: int, index_bits: float) -> float:
    """Bits per element a token costs at `bits`, from its bytes: codes, a fp16 scale and an int16 zero per
    `group` values (b < 16), or fp16 values; plus the token's share of the int32 slot map (`index_bits`)."""
    return (16.0 if bits == 16 else bits + 32.0 / group) + index_bits


def greedy_search(scores: torch.Tensor, sizes: torch.Tensor, widths: tuple[int, ...], budget: float, group: int,
                  index_bits: float) -> torch.Tensor:
    """Assign a width to each item (window or token) so that the size-weighted mean cost stays within
    `budget` bits per element and a higher score never gets fewer bits than a lower one.

    scores, sizes: `[N]`. Items are visited by decreasing score; each takes the widest width that still
    fits and that is no wider than the previous item's (monotone). Starts from everything at the narrowest
    width; raises ValueError if even that exceeds the budget. O(N log N).
    """
    widths = tuple(sorted(set(widths), reverse=True))
    cost = {w: bits_cost(w, group, index_bits) for w in widths}
    total = float(sizes.sum())
    low = widths[-1]
    spare = budget * total - cost[low] * total
    if spare < -1e-9:
        raise ValueError(f"budget must be at least {cost[low]:.3f} bits per element for widths {widths} "
                         f"(group {group}, metadata included), got {budget!r}")
    out = torch.full((len(scores),), low, dtype=torch.int16)
    cap = 0
    for i in torch.argsort(scores.float().cpu(), descending=True, stable=True).tolist():
        n = float(sizes[i])
        for j in range(cap, len(widths)):
            w = widths[j]
            extra = (cost[w] - cost[low]) * n
            if extra <= spare + 1e-9:
                out[i] = w
                spare -= extra
                cap = j
                break
    return out
