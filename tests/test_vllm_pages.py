"""vlmkv's packed page formats (vlmkv/vllm/pages.py) and staging (vlmkv/vllm/staging.py): no vLLM needed.

Pages are checked against vlmkv's own quantizer (`vlmkv.quant.quantize` / `dequantize`, the reference), byte counts
against the layout written out by hand, and the staging slots through their lifecycle."""
import pytest
import torch

from vlmkv.quant import dequantize, fwht, fwht_inverse, quantize
from vlmkv.vllm import Settings, settings_from
from vlmkv.vllm.pages import PageFormat
from vlmkv.vllm.staging import Staging, StagingError

NAMES = [f"{k}-{b}" for k in ("rtn", "kivi") for b in (2, 4, 8)]


def _kv(T, H=3, d=64, seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(T, H, d, generator=g) * 2
    k[..., 5] += 8  # a key outlier channel, as real keys have
    v = torch.randn(T, H, d, generator=g)
    return k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("hadamard", [False, True])
@pytest.mark.parametrize("name", NAMES + ["kivi-2/16"])
def test_pages_hold_exactly_what_vlmkvs_quantizer_gives(name, hadamard):
    """Written then read back, a page equals dequantize(quantize(x)) with the format's QuantSpecs, bit for bit."""
    N, d = 32, 64
    name, _, kg = name.partition("/")
    f = PageFormat.parse(name, d, N, 0, hadamard, int(kg or 0))
    k, v = _kv(2 * N)
    rot = (lambda x: fwht(x.float())) if hadamard else (lambda x: x)
    unrot = fwht_inverse if hadamard else (lambda x: x)
    if f.kind == "rtn":
        rows = f.quantize_tokens(k, v)  # [T, H, C]
        assert rows.dtype == torch.uint8 and rows.shape == (2 * N, 3, f.token_bytes)
        pages = rows.view(2, N, 3, -1).permute(0, 2, 1, 3).contiguous()
        kb, vb = k.view(2, N, 3, d).permute(0, 2, 1, 3), v.view(2, N, 3, d).permute(0, 2, 1, 3)
        want_k = unrot(dequantize(quantize(rot(kb).reshape(-1, 1, d), f.key_spec), torch.float32).reshape(2, 3, N, d))
        want_v = unrot(dequantize(quantize(rot(vb).reshape(-1, 1, d), f.value_spec), torch.float32).reshape(2, 3, N, d))
    else:
        kb, vb = k.view(2, N, 3, d).permute(0, 2, 1, 3), v.view(2, N, 3, d).permute(0, 2, 1, 3)
        pages = f.quantize_blocks(kb, vb)
        want_k = unrot(dequantize(quantize(rot(kb), f.key_spec), torch.float32))
        want_v = unrot(dequantize(quantize(rot(vb), f.value_spec), torch.float32))
    got_k, got_v = f.dequantize_pages(pages, torch.float32)
    torch.testing.assert_close(got_k, want_k.float(), rtol=0, atol=0)
    torch.testing.assert_close(got_v, want_v.float(), rtol=0, atol=0)
    # and it is a quantization of the input: within a step of each group
    err = (got_v - vb.float()).abs().max()
    assert err < (vb.float().amax() - vb.float().amin()) / (2 ** f.bits - 1) * (2 if hadamard else 1.01)


def test_page_bytes_are_the_layout_written_out():
    """C counts codes, fp16 scales, int16 zero points and padding; per-channel key metadata is spread over a block."""
    f = PageFormat.parse("rtn-4", 64, 128)
    assert f.token_bytes == 2 * (32 + 2 + 2)
    f = PageFormat.parse("kivi-2", 64, 128)  # key groups of 64 tokens: two rows of per-channel scales a block
    region = 128 * 16 + 2 * 64 * 4 + 128 * 16 + 128 * 4  # K codes, K scale+zero a channel a group, V codes, V meta
    assert f.token_bytes == -(-region // 128) == 40
    assert f.token_bytes * 128 >= f.used_bytes == region
    assert PageFormat.parse("kivi-2", 64, 128, key_group=128).token_bytes == 38
    assert PageFormat.parse("kivi-2", 64, 96).kgroup == 96  # 64 does not divide the block: one group a block
    f = PageFormat.parse("rtn-8", 64, 32, group_size=32)
    assert f.token_bytes == 2 * (64 + 2 * 2 + 2 * 2)
    # capacity against bf16 pages (2 * 64 * 2 bytes a token and head)
    assert 256 / PageFormat.parse("kivi-4", 64, 128).token_bytes >= 3.5
    assert 256 / PageFormat.parse("kivi-2", 64, 128).token_bytes >= 6.0


def test_a_page_format_names_the_vlmkv_policy_that_stores_it():
    assert PageFormat.parse("rtn-4", 64, 128).policy().describe().startswith("rtn(bits=4, group_size=64")
    p = PageFormat.parse("kivi-2", 64, 128, hadamard=True).policy()
    assert p.hadamard_keys and p.inner.schedule == "paged" and p.inner.group_size == 64
    assert p.inner.residual_length == 128
    f = PageFormat.parse("kivi-4", 64, 128, group_size=32, key_group=32)
    p = f.policy()
    assert p.spec(4, "key", 64) == f.key_spec and p.spec(4, "value", 64) == f.value_spec


@pytest.mark.parametrize("bad, match", [
    ({"vlmkv": {"format": "int3"}}, "format must be one of"),
    ({"vlmkv": {"format": "kivi-2", "colour": 1}}, "must be a dict"),
    ({"vlmkv": "kivi-2"}, "must be a dict"),
    ({"vlmkv": {"format": "rtn-4", "group_size": 48}}, "group_size must divide"),
    ({"vlmkv": {"format": "rtn-4", "group_size": -1}}, "group_size"),
    ({"vlmkv": {"format": "rtn-4", "hadamard": "yes"}}, "hadamard"),
    ({"vlmkv": {"format": "kivi-4", "key_group": 48}}, "key_group must divide"),
    ({"vlmkv": {"format": "rtn-4", "key_group": 32}}, "key_group"),
])
def test_settings_refuse_what_they_cannot_serve(bad, match):
    with pytest.raises(ValueError, match=match):
        settings_from(bad)


def test_settings_absent_means_the_plugin_stays_out_of_the_way():
    assert settings_from({}) is None and settings_from({"other": 1}) is None
    assert settings_from({"vlmkv": {"format": "kivi-4", "hadamard": True}}) == Settings("kivi-4", 0, True)


def test_odd_head_dims_refuse_hadamard():
    with pytest.raises(ValueError, match="even dimension"):
        PageFormat("rtn", 4, 63, 32, 0, True)


def test_staging_lifecycle():
    """Slot 0 opens a block, consecutive writes fill it, the last token hands it back; reads check the count."""
    st = Staging(2, 4, 8, torch.float32, "cpu", slots=2, cap=4)
    k = torch.arange(4 * 2 * 8, dtype=torch.float32).view(4, 2, 8)
    st.begin_step()
    assert st.write(7, 0, k[:3], -k[:3]) is None
    torch.testing.assert_close(st.prefix(7, 3)[0], k[:3].transpose(0, 1))
    torch.testing.assert_close(st.prefix(7, 3)[1], -k[:3].transpose(0, 1))
    with pytest.raises(StagingError, match="holds 3 tokens"):
        st.prefix(7, 4)
    st.begin_step()
    slot = st.write(7, 3, k[3:], -k[3:])
    assert slot is not None
    torch.testing.assert_close(st.buf[slot, 0], k.transpose(0, 1))
    st.release(slot)
    with pytest.raises(StagingError, match="holds nothing"):
        st.prefix(7, 1)
    with pytest.raises(StagingError, match="not staged"):
        st.write(7, 2, k[:1], k[:1])  # a write into the middle of a block nobody opened


def test_staging_refuses_gaps_and_takes_rollbacks():
    st = Staging(1, 8, 4, torch.float32, "cpu")
    x = torch.ones(3, 1, 4)
    st.begin_step()
    st.write(1, 0, x, x)
    with pytest.raises(StagingError, match="gap"):
        st.write(1, 5, x[:1], x[:1])
    st.write(1, 1, 2 * x[:1], 2 * x[:1])  # a rollback: what followed slot 1 is dropped
    assert st.fill[st.slot_of[1]] == 2


def test_staging_grows_to_its_cap_then_reuses_the_oldest_slot_and_a_lost_block_raises():
    st = Staging(1, 4, 2, torch.float32, "cpu", slots=1, cap=2)
    x = torch.ones(1, 1, 2)
    for step, blk in enumerate([10, 11, 12]):  # three partly filled blocks, room for two
        st.begin_step()
        st.write(blk, 0, x, x)
    assert st.slots == 2 and 10 not in st.slot_of  # the slot written longest ago went to block 12
    with pytest.raises(StagingError, match="reclaimed"):
        st.prefix(10, 1)
    st.begin_step()
    for blk in (20, 21):  # within one step nothing written in that step is reclaimed: the pool grows past the cap
        st.write(blk, 0, x, x)
    assert {20, 21} <= set(st.slot_of)


TRITON_CASES = [("rtn-4", 0, False, 0), ("rtn-2", 0, True, 0), ("rtn-8", 32, False, 0), ("kivi-4", 0, False, 0),
                ("kivi-2", 0, True, 8), ("kivi-8", 0, False, 0)]


@pytest.mark.parametrize("name, group, hadamard, key_group", TRITON_CASES)
def test_triton_paged_decode_reads_every_page_format_as_the_reference(name, group, hadamard, key_group):
    """The CUDA side's kernel (Triton's interpreter here, compiled on a GPU) against `paged_decode_ref`, which reads
    the pages through `PageFormat.dequantize_pages`; both float32, so they differ by summation order only."""
    pytest.importorskip("triton")
    from vlmkv.kernels.triton_pages import paged_decode, paged_decode_ref

    N, d, H, Hq = 16, 64, 2, 6
    f = PageFormat.parse(name, d, N, group, hadamard, key_group)
    g = torch.Generator().manual_seed(1)
    k, v = _kv(6 * N, H, d, seed=2, dtype=torch.float32)
    kb, vb = k.view(6, N, H, d).permute(0, 2, 1, 3), v.view(6, N, H, d).permute(0, 2, 1, 3)
    if f.kind == "rtn":
        pages = f.quantize_tokens(k, v).view(6, N, H, -1).permute(0, 2, 1, 3).contiguous()
    else:
        pages = f.quantize_blocks(kb, vb)
    table = torch.tensor([[3, 1, 5], [0, 2, 0], [4, 0, 0]], dtype=torch.int32)
    if f.staged:  # complete blocks from the pages, the own block raw
        npage, valid, raw_len = torch.tensor([3, 1, 0]), torch.tensor([N, N, N]), torch.tensor([5, N, 1])
    else:  # every block from the pages, the last one partly filled
        npage, valid, raw_len = torch.tensor([3, 2, 1]), torch.tensor([7, N, 1]), torch.tensor([0, 0, 0])
    raw = torch.randn(3, 2, H, N, d, generator=g)
    q = torch.randn(3, Hq, d, generator=g)
    want = paged_decode_ref(q, pages, table, npage, valid, raw, raw_len, f, d ** -0.5)
    got = paged_decode(q, pages, table, npage, valid, raw, raw_len, f, d ** -0.5)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
