"""Modality spans: label every prefill token as text, image/video, special or padding, with its image index.

One small adapter per model family (`vlmkv/models/families/`), chosen by `config.model_type`:

    spans = label_tokens(model.config, input_ids, attention_mask, tokenizer=None)
    spans.token_types  # int8 [B, S]: PAD=-1, TEXT=0, IMAGE=1 (image or video), SPECIAL=2 (vision delimiters)
    spans.frame_ids    # long [B, S]: image/frame index within its row (0, 1, ...), -1 for non-visual tokens

To add a family: write `families/<name>.py` with a subclass of `ModalityAdapter` decorated with
`@register_family("model_type", ...)` and import it in `families/__init__.py`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..labels import IMAGE, PAD, SPECIAL, TEXT  # noqa: F401  (re-exported)


@dataclass
class Spans:
    token_types: torch.Tensor  # int8 [B, S]
    frame_ids: torch.Tensor  # long [B, S]

    def counts(self) -> dict[str, int]:
        t = self.token_types
        return {"pad": int((t == PAD).sum()), "text": int((t == TEXT).sum()),
                "image": int((t == IMAGE).sum()), "special": int((t == SPECIAL).sum())}


_FAMILIES: dict[str, type["ModalityAdapter"]] = {}


def register_family(*model_types: str):
    def deco(cls):
        for mt in model_types:
            _FAMILIES[mt] = cls
        cls.model_types = model_types
        return cls
    return deco


def _cfg_get(cfg, *names, default=None):
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


class ModalityAdapter:
    """Labels tokens for one family. Subclasses set the token ids from the config in `__init__` and may
    override `split_frames` to cut a run of visual tokens into images/frames."""

    model_types: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config, tokenizer=None):
        self.config = config
        self.tokenizer = tokenizer
        self.visual_ids: set[int] = set()
        self.special_ids: set[int] = set()

    def _token_id(self, token: str) -> int | None:
        """Id of a special token string, if a tokenizer was given and knows it."""
        if self.tokenizer is None:
            return None
        tid = self.tokenizer.convert_tokens_to_ids(token)
        unk = getattr(self.tokenizer, "unk_token_id", None)
        return None if tid is None or (unk is not None and tid == unk and token != self.tokenizer.unk_token) else int(tid)

    def frame_length(self, row_ids: list[int], start: int, end: int) -> int | None:
        """Tokens per image/frame for the visual run [start, end), or None to keep the run whole."""
        return None

    def new_image_before(self, row_ids: list[int], start: int) -> bool:
        """Whether the visual run starting at `start` begins a new image (default: every run does).
        Called once per run, in order; `start_row` is called before each row that has visual tokens."""
        return True

    def start_row(self) -> None:
        return None

    def label(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **inputs) -> Spans:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)!r}")
        B, S = input_ids.shape
        types = torch.full((B, S), TEXT, dtype=torch.int8)
        frames = torch.full((B, S), -1, dtype=torch.long)
        ids_cpu = input_ids.detach().to("cpu")
        vis = torch.zeros(B, S, dtype=torch.bool)
        for t in self.visual_ids:
            vis |= ids_cpu == t
        spc = torch.zeros(B, S, dtype=torch.bool)
        for t in self.special_ids:
            spc |= ids_cpu == t
        types[vis] = IMAGE
        types[spc] = SPECIAL
        if attention_mask is not None:
            types[attention_mask.detach().to("cpu") == 0] = PAD
        for b in range(B):
            if not bool(vis[b].any()):
                continue  # nothing visual in this row: no image runs to walk
            row = ids_cpu[b].tolist()
            v = vis[b].tolist()
            frame = -1
            i = 0
            self.start_row()
            while i < S:
                if not v[i]:
                    i += 1
                    continue
                j = i
                while j < S and v[j]:
                    j += 1
                if self.new_image_before(row, i) or frame < 0:
                    frame += 1
                n = self.frame_length(row, i, j)
                if n:
                    for k in range(i, j):
                        frames[b, k] = frame + (k - i) // n
                    frame += (j - i - 1) // n
                else:
                    frames[b, i:j] = frame
                i = j
        return Spans(types, frames)


class TextOnlyAdapter(ModalityAdapter):
    """Language models: every token is text (padding aside)."""


def has_vision(config) -> bool:
    return any(getattr(config, n, None) is not None for n in ("vision_config", "vision_tower", "visual"))


def adapter_for(config, tokenizer=None) -> ModalityAdapter:
    """The family adapter for `config`; text-only models get `TextOnlyAdapter`."""
    from . import families  # noqa: F401  (registration)

    mt = getattr(config, "model_type", None)
    if mt in _FAMILIES:
        return _FAMILIES[mt](config, tokenizer)
    if not has_vision(config):
        return TextOnlyAdapter(config, tokenizer)
    raise ValueError(
        f"config.model_type has no modality adapter, got {mt!r}: add one in vlmkv/models/families/{mt}.py "
        f"(a ModalityAdapter subclass decorated with @register_family({mt!r})) and import it in "
        f"vlmkv/models/families/__init__.py; known families: {sorted(_FAMILIES)}"
    )


def label_tokens(config, input_ids, attention_mask=None, tokenizer=None, **inputs) -> Spans:
    return adapter_for(config, tokenizer).label(input_ids, attention_mask, **inputs)


def list_families() -> list[str]:
    from . import families  # noqa: F401

    return sorted(_FAMILIES)
