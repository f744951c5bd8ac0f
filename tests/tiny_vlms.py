"""Tiny random-weight VLMs of real transformers families, built from configs (no download), and a
padded batch of two rows with two images each, with the expected modality labels."""
from __future__ import annotations

import inspect

import torch

V = 300  # vocab; ids 290-299 are reserved for vision tokens
TEXT_CFG = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=2048, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _rows(n_img_tokens: list[int], img_id: int, before=None, after=None, wrap=None):
    """Two rows: row 0 = 3 text, img, 2 text, img, 3 text; row 1 = 1 text, img, 1 text, img, 2 text, left-padded."""
    g = torch.Generator().manual_seed(0)
    txt = lambda n: torch.randint(3, 280, (n,), generator=g).tolist()
    rows, types, frames = [], [], []
    for layout in ((3, 2, 3), (1, 1, 2)):
        ids, ty, fr = [], [], []
        ids += txt(layout[0]); ty += [0] * layout[0]; fr += [-1] * layout[0]
        for k, n in enumerate(n_img_tokens):
            if wrap:
                ids.append(wrap[0]); ty.append(2); fr.append(-1)
            ids += [img_id] * n; ty += [1] * n; fr += [k] * n
            if wrap:
                ids.append(wrap[1]); ty.append(2); fr.append(-1)
            m = layout[1] if k == 0 else layout[2]
            ids += txt(m); ty += [0] * m; fr += [-1] * m
        rows.append(ids); types.append(ty); frames.append(fr)
    S = max(len(r) for r in rows)
    input_ids = torch.zeros(2, S, dtype=torch.long)
    mask = torch.zeros(2, S, dtype=torch.long)
    tt = torch.full((2, S), -1, dtype=torch.int8)
    ff = torch.full((2, S), -1, dtype=torch.long)
    for b, (r, t, f) in enumerate(zip(rows, types, frames)):
        input_ids[b, S - len(r):] = torch.tensor(r)
        mask[b, S - len(r):] = 1
        tt[b, S - len(r):] = torch.tensor(t, dtype=torch.int8)
        ff[b, S - len(r):] = torch.tensor(f)
    return input_ids, mask, tt, ff


def tiny_llava():
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          image_size=32, patch_size=8, projection_dim=32)
    cfg = LlavaConfig(text_config=dict(model_type="llama", **TEXT_CFG), vision_config=vc.to_dict(),
                      image_token_index=299, vision_feature_layer=-1)
    model = LlavaForConditionalGeneration(cfg).eval()
    n = 16
    ids, mask, tt, ff = _rows([n, n], 299)
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(4, 3, 32, 32))
    return model, inputs, tt, ff


def tiny_qwen2_vl():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(0)
    tc = dict(TEXT_CFG, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    vc = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, patch_size=4, spatial_merge_size=2,
              temporal_patch_size=2, in_channels=3)
    cfg = Qwen2VLConfig(text_config=tc, vision_config=vc, image_token_id=290, video_token_id=291,
                        vision_start_token_id=292, vision_end_token_id=293, eos_token_id=2, pad_token_id=0, bos_token_id=1)
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    ids, mask, tt, ff = _rows([4, 4], 290, wrap=(292, 293))
    thw = torch.tensor([[1, 4, 4]] * 4)
    px = torch.randn(int(thw.prod(-1).sum()), 3 * 2 * 4 * 4)
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=px, image_grid_thw=thw)
    if "mm_token_type_ids" in inspect.signature(Qwen2VLForConditionalGeneration.forward).parameters:
        inputs["mm_token_type_ids"] = (ids == 290).long()  # transformers >= 5.x's newer releases take it
    return model, inputs, tt, ff


def tiny_idefics3(model_type="idefics3"):
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, SmolVLMConfig, SmolVLMForConditionalGeneration

    torch.manual_seed(0)
    Cfg, Model = (Idefics3Config, Idefics3ForConditionalGeneration) if model_type == "idefics3" else \
        (SmolVLMConfig, SmolVLMForConditionalGeneration)
    vc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)
    cfg = Cfg(text_config=dict(model_type="llama", **TEXT_CFG), vision_config=vc, scale_factor=2, image_token_id=299,
              pad_token_id=0)
    model = Model(cfg).eval()
    n = (32 // 8) ** 2 // 4
    ids, mask, tt, ff = _rows([n, n], 299)
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(2, 2, 3, 32, 32))
    return model, inputs, tt, ff


def tiny_llava_onevision():
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    torch.manual_seed(0)
    vc = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
              num_attention_heads=2, image_size=32, patch_size=8)
    cfg = LlavaOnevisionConfig(text_config=dict(model_type="qwen2", **TEXT_CFG), vision_config=vc,
                               image_token_index=299, video_token_index=298, vision_feature_layer=-1,
                               image_grid_pinpoints=[[32, 32]], vision_aspect_ratio="anyres_max_1")
    model = LlavaOnevisionForConditionalGeneration(cfg).eval()
    # one 32x32 tile per image: count the feature tokens the model really produces
    px = torch.randn(4, 2, 3, 32, 32)  # base + 1 grid tile per image
    sizes = torch.tensor([[32, 32]] * 4)
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=px, image_sizes=sizes, vision_feature_layer=-1,
                                               vision_feature_select_strategy=cfg.vision_feature_select_strategy)
    feats = getattr(feats, "pooler_output", feats)
    n = feats[0].shape[0]
    ids, mask, tt, ff = _rows([n, n], 299)
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=px, image_sizes=sizes)
    return model, inputs, tt, ff


FAMILIES = {"llava": tiny_llava, "qwen2_vl": tiny_qwen2_vl, "idefics3": tiny_idefics3,
            "smolvlm": lambda: tiny_idefics3("smolvlm"), "llava_onevision": tiny_llava_onevision}


def expected_bytes(cache) -> int:
    """Bytes the plan implies: per token and kv head, K and V each take D*b/8 code bytes plus a fp16 scale and
    int16 zero per group (b < 16), or D fp16 values; plus each segment's slot map (with its spare room), the residual
    buffer and its width map where the buffered tokens' widths differ."""
    total = 0
    for layer in cache.layers:
        st = layer.store
        for bits, seg in st.segments.items():
            t = seg.k.codes
            b, h = t.shape[:2]
            n = seg.capacity  # spare capacity is held, so it counts
            d = cache.head_dim
            g = min(128, d)
            per_tok = d * 2 if bits == 16 else d * bits // 8 + 4 * (d // g)
            index = seg._ibuf if seg._ibuf is not None else seg.index  # a growing slot map's spare room counts too
            total += 2 * b * h * n * per_tok + (0 if index is None else index.numel() * 4)
        if st.residual is not None:  # the residual buffer's spare room is held, so it counts too
            b, h, cap, d = st.residual.kb.shape
            total += 2 * b * h * cap * d * 2 + (0 if st.residual.bb is None else b * cap * 2)  # width map if mixed
    return total
