"""A local VLM directory (tiny random LLaVA with SmolLM2's tokenizer and a real LlavaProcessor) through
`load_model` and `vlmkv generate --image`: the path a user with downloaded weights takes."""
import pytest
import torch

from vlmkv.cli import main

TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
            "{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="module")
def local_llava(tmp_path_factory, smollm2):
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    _, tok = smollm2
    tok = type(tok).from_pretrained(tok.name_or_path)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_id = tok.convert_tokens_to_ids("<image>")
    torch.manual_seed(0)
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          image_size=32, patch_size=8, projection_dim=32)
    tc = dict(model_type="llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id)
    model = LlavaForConditionalGeneration(LlavaConfig(text_config=tc, vision_config=vc.to_dict(),
                                                      image_token_index=image_id, vision_feature_layer=-1))
    proc = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                          tokenizer=tok, patch_size=8, vision_feature_select_strategy="default", chat_template=TEMPLATE,
                          num_additional_image_tokens=1)
    d = tmp_path_factory.mktemp("tiny-llava")
    model.save_pretrained(d)
    proc.save_pretrained(d)
    img = d / "frame.png"
    Image.fromarray((torch.rand(40, 40, 3) * 255).byte().numpy()).save(img)
    return d, img


@pytest.mark.parametrize("method", ["akvq-vl", "windowquant"])
def test_generate_with_images_on_a_local_vlm(local_llava, capsys, method):
    d, img = local_llava
    opts = ["--option", "budget=6"] if method == "windowquant" else []
    assert main(["generate", "--model", str(d), "--method", method, "--image", str(img), "--image", str(img),
                 "--prompt", "What changed between the two frames?", "--max-new-tokens", "4", *opts]) == 0
    out = capsys.readouterr().out
    assert "KV cache" in out and "FP16 would be" in out


def test_inspect_with_images_on_a_local_vlm(local_llava, tmp_path, capsys):
    d, img = local_llava
    assert main(["inspect", "--model", str(d), "--image", str(img), "--prompt", "Describe it.", "--out", str(tmp_path)]) == 0
    import json

    rep = json.loads((tmp_path / "attention_report.json").read_text())
    assert rep["n_visual"] == 16
