"""What AKVQ-VL relies on, measured on a model and one input (seed 002, Section III-A, Table I, Figs 1, 3, 4).

For each layer and head, with eager attention (this tool only), the average attention a token
receives, split by group: text tokens, visual tokens and pivot tokens (tokens whose residual stream
entering the layer carries a massive activation, as `akvq-vl` finds them). Token j's score is the mean
of A[i, j] over the queries i >= j that can see it; the first 5 positions are left out of the text and
visual groups (as Figure 4 does, against sink tokens).

Per layer: TSA ("text-salient") when visual tokens exist and most heads give text tokens at least
`tsa_ratio` times the attention of visual tokens; PSA ("pivot-token-salient") when the pivot tokens take
at least `psa_mass` of the attention of the queries after them, averaged over heads.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..models.modality import IMAGE, PAD, SPECIAL, TEXT
from ..cache import cache_kwargs


@dataclass
class AttentionReport:
    num_layers: int
    num_heads: int
    seq_len: int
    n_text: int
    n_visual: int
    pivots: dict = field(default_factory=dict)  # layer -> token positions
    text: list = field(default_factory=list)  # [layer][head] mean attention received per text token
    visual: list = field(default_factory=list)
    pivot: list = field(default_factory=list)
    pivot_mass: list = field(default_factory=list)  # [layer] share of attention taken by pivot tokens
    pattern: list = field(default_factory=list)  # [layer] "TSA" / "PSA" / "TSA+PSA" / "-"
    received: list = field(default_factory=list)  # [layer][position] head-mean attention received
    token_types: list = field(default_factory=list)

    def table_i(self) -> dict:
        """Layers per pattern, in the layout of the paper's Table I."""
        def ranges(idx):
            if not idx:
                return "None"
            out, start = [], idx[0]
            for a, b in zip(idx, idx[1:] + [None]):
                if b != a + 1:
                    out.append(f"{start}" if start == a else f"{start}-{a}")
                    start = b
            return ", ".join(out)
        tsa = [i for i, p in enumerate(self.pattern) if "TSA" in p]
        psa = [i for i, p in enumerate(self.pattern) if "PSA" in p]
        return {"TSA layers": ranges(tsa), "PSA layers": ranges(psa)}

    def to_markdown(self) -> str:
        t = self.table_i()
        lines = [f"TSA layers: {t['TSA layers']}; PSA layers: {t['PSA layers']} "
                 f"({self.seq_len} tokens: {self.n_text} text, {self.n_visual} visual)", "",
                 "| layer | pattern | text (per token) | visual (per token) | pivot (per token) | pivot share | pivots |",
                 "|---:|---|---:|---:|---:|---:|---|"]
        mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")
        for l in range(self.num_layers):
            lines.append(f"| {l} | {self.pattern[l]} | {mean(self.text[l]):.4f} | {mean(self.visual[l]):.4f} | "
                         f"{mean(self.pivot[l]):.4f} | {self.pivot_mass[l]:.2f} | {self.pivots.get(l, [])} |")
        return "\n".join(lines)

    def save(self, out_dir) -> list[Path]:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "attention_report.json").write_text(json.dumps(asdict(self)))
        (out / "attention_report.md").write_text(self.to_markdown() + "\n")
        return [out / "attention_report.json", out / "attention_report.md"]


def _set_text_attn(model, name):
    from ..attention import _set_impl

    _set_impl(model, name)


@torch.no_grad()
def inspect_attention(model, inputs: dict, tokenizer=None, num_pivots: int = 15, pivot_threshold: float = 100.0,
                      tsa_ratio: float = 1.5, psa_mass: float = 0.5, skip_first: int = 5, keep_maps: bool = True):
    """Run `model(**inputs)` once with eager attention and measure the patterns. Batch row 0 is analysed.

    Returns (report, maps): maps is a list over layers of head-mean attention `[S, S]` (float32, CPU) when
    `keep_maps`, else None.
    """
    from ..cache import QuantizedKVCache, text_config
    from ..policies import get_policy

    orig = text_config(model)._attn_implementation or "sdpa"
    _set_text_attn(model, "eager")
    try:
        # fp16 storage with the massive-activation hooks of the pivot wrapper: the ratios reach cache.layer_stats
        with QuantizedKVCache(model, "fp16+pivots", tokenizer=tokenizer, inspect=True) as cache:
            out = model(**inputs, **cache_kwargs(cache), output_attentions=True, use_cache=True)
            stats = {l: s["massive_activation"][:1] for l, s in cache.layer_stats.items()}
            types = cache.inputs.get("token_types")
    finally:
        _set_text_attn(model, orig)
    atts = [a for a in (out.attentions or ()) if a is not None]
    if not atts:
        raise ValueError(f"model must return attention weights with eager attention, got none from {type(model).__name__!r}")
    S = atts[0].shape[-1]
    types = (types[0] if types is not None else torch.full((S,), TEXT, dtype=torch.int8)).cpu()
    piv_policy = get_policy("akvq-vl", num_pivots=num_pivots, pivot_threshold=pivot_threshold)
    rep = AttentionReport(num_layers=len(atts), num_heads=atts[0].shape[1], seq_len=S,
                          n_text=int(((types == TEXT) | (types == SPECIAL)).sum()), n_visual=int((types == IMAGE).sum()),
                          token_types=types.tolist())
    pos = torch.arange(S)
    maps = [] if keep_maps else None
    valid = types != PAD
    for l, a in enumerate(atts):
        a = a[0].float().cpu()  # [H, S, S]
        # mean over the queries that can see key j (causal): rows i >= j, padding rows excluded
        seen = torch.tril(torch.ones(S, S)) * valid[:, None].float()
        received = (a * seen).sum(1) / seen.sum(0).clamp_min(1)  # [H, S]
        ratio = stats.get(l)
        if ratio is not None:
            from ..policies.base import PrefillContext

            ctx = PrefillContext(keys=torch.zeros(1, 1, S, 1), values=torch.zeros(1, 1, S, 1),
                                 attention_mask=valid[None], massive_activation=ratio.cpu())
            piv = piv_policy.pivot_mask(ctx)[0]
        else:
            piv = torch.zeros(S, dtype=torch.bool)
        rep.pivots[l] = piv.nonzero().flatten().tolist()
        late = pos >= skip_first
        text_m = ((types == TEXT) | (types == SPECIAL)) & ~piv & late
        vis_m = (types == IMAGE) & ~piv & late
        grp = lambda m: received[:, m].mean(1).tolist() if m.any() else []
        rep.text.append(grp(text_m))
        rep.visual.append(grp(vis_m))
        rep.pivot.append(grp(piv))
        # share of attention the pivot tokens take, over queries after the first pivot
        if piv.any():
            first = int(piv.nonzero()[0])
            rows = (pos > first) & valid
            mass = a[:, rows][:, :, piv].sum(-1).mean().item()
        else:
            mass = 0.0
        rep.pivot_mass.append(mass)
        tsa = False
        if rep.text[-1] and rep.visual[-1]:
            wins = sum(t >= tsa_ratio * v for t, v in zip(rep.text[-1], rep.visual[-1]))
            tsa = wins > len(rep.text[-1]) / 2
        psa = mass >= psa_mass
        rep.pattern.append("TSA+PSA" if tsa and psa else "TSA" if tsa else "PSA" if psa else "-")
        rep.received.append(received.mean(0).tolist())
        if keep_maps:
            maps.append(a.mean(0))
    return rep, maps


def plot_attention(report: AttentionReport, maps, out_dir, bin_size: int = 8, layers=None) -> list[Path]:
    """Heat maps like Figures 1 and 3: per-layer attention maps (head mean, `bin_size`-token bins) and the
    attention each token position receives, layer by layer. Needs matplotlib (`pip install 'vlmkv[plot]'`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import LogNorm
    except ImportError as e:
        raise ImportError("plots need matplotlib: pip install 'vlmkv[plot]'") from e
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    S, L = report.seq_len, report.num_layers
    nb = (S + bin_size - 1) // bin_size

    def binned(m):  # [S, S] -> [nb, nb] mean over bins
        pad = nb * bin_size - S
        m = torch.nn.functional.pad(m, (0, pad, 0, pad))
        return m.view(nb, bin_size, nb, bin_size).mean((1, 3))

    types = torch.tensor(report.token_types)
    paths = []
    if maps:
        layers = layers or sorted({0, 1, L // 2, L - 1})
        fig, axes = plt.subplots(1, len(layers), figsize=(4 * len(layers), 4))
        for ax, l in zip(list(axes) if len(layers) > 1 else [axes], layers):
            m = binned(maps[l]).clamp_min(1e-6)
            ax.imshow(m.numpy(), norm=LogNorm(vmin=1e-5, vmax=1), cmap="viridis")
            ax.set_title(f"layer {l}: {report.pattern[l]}")
            ax.set_xlabel(f"key (bins of {bin_size} tokens)")
            ax.set_ylabel("query")
            vis = (types == IMAGE).nonzero().flatten()
            if len(vis):
                ax.axvspan(int(vis[0]) / bin_size, int(vis[-1]) / bin_size, color="red", alpha=0.08)
        fig.suptitle("Attention maps (head mean, log scale); red band: visual tokens")
        fig.tight_layout()
        p = out / "attention_maps.png"
        fig.savefig(p, dpi=90)
        plt.close(fig)
        paths.append(p)
    rec = torch.tensor(report.received)  # [L, S]
    pad = nb * bin_size - S
    rec = torch.nn.functional.pad(rec, (0, pad)).view(L, nb, bin_size).mean(-1).clamp_min(1e-6)
    fig, ax = plt.subplots(figsize=(10, 0.25 * L + 2))
    ax.imshow(rec.numpy(), aspect="auto", norm=LogNorm(vmin=1e-4, vmax=1), cmap="magma")
    ax.set_xlabel(f"token position (bins of {bin_size})")
    ax.set_ylabel("layer")
    ax.set_yticks(range(L))
    ax.set_yticklabels([f"{l} {report.pattern[l]}" for l in range(L)], fontsize=7)
    ax.set_title("Average attention received per token, by layer (log scale)")
    fig.tight_layout()
    p = out / "attention_received.png"
    fig.savefig(p, dpi=90)
    plt.close(fig)
    paths.append(p)
    return paths
