"""`linears_via_fp32`: bf16 linear layers through float32 GEMMs (vlmkv/models/cpu_bf16.py), and `eval --linears`."""
import json

import pytest
import torch
from torch import nn

from vlmkv.cli import main
from vlmkv.models.cpu_bf16 import Fp32Linear, linears_via_fp32


def _ulps_from_reference(y: torch.Tensor, ref64: torch.Tensor) -> torch.Tensor:
    """|y - ref| in units of bf16's spacing at ref (float64 reference, before its rounding to bf16)."""
    spacing = 2.0 ** (torch.floor(torch.log2(ref64.abs().clamp_min(2.0 ** -100))) - 7)
    return (y.double() - ref64).abs() / spacing


@pytest.mark.parametrize("bias", [True, False])
def test_fp32_linear_matches_the_native_bf16_op_to_its_own_rounding(bias):
    """Against a float64 reference of the same bf16 inputs, the float32 path is as close as the native bf16 kernel:
    within one bf16 rounding step (plus float32 summation error), element for element."""
    torch.manual_seed(0)
    lin = nn.Linear(96, 80, bias=bias).to(torch.bfloat16).requires_grad_(False)
    x = torch.randn(3, 37, 96).to(torch.bfloat16)
    ref = x.double() @ lin.weight.double().T + (lin.bias.double() if bias else 0)
    with torch.no_grad():
        native = lin(x)
        assert linears_via_fp32(lin) == 1 and type(lin) is Fp32Linear
        fast = lin(x)
    assert fast.dtype == native.dtype == torch.bfloat16 and fast.shape == native.shape
    worst_native = _ulps_from_reference(native, ref).max()
    worst_fast = _ulps_from_reference(fast, ref).max()
    assert float(worst_fast) <= max(1.0, float(worst_native)) + 1e-3, (worst_fast, worst_native)


def test_fp32_copies_follow_in_place_updates_and_stay_out_of_the_state_dict():
    torch.manual_seed(1)
    lin = nn.Linear(16, 8).to(torch.bfloat16)
    keys = set(lin.state_dict())
    linears_via_fp32(lin)
    x = torch.randn(4, 16).to(torch.bfloat16)
    with torch.no_grad():
        before = lin(x)
        lin.weight.mul_(2)  # an in-place change (an optimizer step, load_state_dict): no stale float32 copy
        lin.bias.zero_()
        after = lin(x)
        want = torch.nn.functional.linear(x.double(), lin.weight.double()).to(torch.bfloat16)
    assert not torch.equal(before, after)
    assert _ulps_from_reference(after, x.double() @ lin.weight.double().T).max() <= 1.0 + 1e-3, (after, want)
    assert set(lin.state_dict()) == keys


def test_training_keeps_the_native_op_so_gradients_reach_the_parameters():
    lin = nn.Linear(8, 4).to(torch.bfloat16)
    linears_via_fp32(lin)
    lin(torch.randn(2, 8).to(torch.bfloat16)).float().sum().backward()
    assert lin.weight.grad is not None and lin.bias.grad is not None


def test_only_half_precision_plain_linears_change():
    class Sub(nn.Linear):
        pass

    m = nn.ModuleDict({"a": nn.Linear(4, 4).to(torch.bfloat16), "b": nn.Linear(4, 4), "c": Sub(4, 4).half()})
    assert linears_via_fp32(m) == 1
    assert type(m["a"]) is Fp32Linear and type(m["b"]) is nn.Linear and type(m["c"]) is Sub
    with pytest.raises(ValueError, match="model must be a torch.nn.Module"):
        linears_via_fp32("not a model")


def test_a_model_keeps_its_logits(tiny_llama):
    """A whole bf16 model: next-token logits through float32 linears agree with the native bf16 run as closely
    as the native run agrees with a float32 model (both are bf16 roundings of the same computation)."""
    import copy

    ids = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(2))
    m16 = copy.deepcopy(tiny_llama).to(torch.bfloat16)
    with torch.no_grad():
        ref = copy.deepcopy(m16).float()(ids).logits  # the bf16 weights, computed in float32 throughout
        native = m16(ids).logits.float()
        assert linears_via_fp32(m16) == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer, and lm_head
        fast = m16(ids).logits.float()
    assert (fast - ref).abs().max() <= 2 * (native - ref).abs().max() + 1e-6


def test_eval_records_the_linears_setting_and_resume_will_not_mix_them(local_llava, tmp_path, capsys):
    d, _ = local_llava
    data = tmp_path / "data"
    main(["make-data", "--out", str(data), "--tasks", "FrameColour", "--samples", "1", "--frames", "4"])
    common = ["eval", "--model", str(d), "--data", str(data), "--methods", "fp16", "--max-new-tokens", "2",
              "--no-fidelity", "--out", str(tmp_path / "o")]
    assert main(common + ["--dtype", "bfloat16", "--linears", "fp32"]) == 0
    assert json.loads((tmp_path / "o" / "run.json").read_text())["linears"] == "float32 (linears_via_fp32)"
    capsys.readouterr()
    # the native kernel sums in another order: its answers belong to another run
    assert main(common + ["--dtype", "bfloat16", "--resume"]) == 2
    assert "resume needs the settings" in capsys.readouterr().err
    # a float32 model has nothing to compute in float32: refused, not ignored
    assert main(common + ["--linears", "fp32"]) == 2
    assert "--linears fp32 is for a bfloat16/float16 model" in capsys.readouterr().err


def test_apply_linears_is_the_one_check_for_every_entry_point():
    """`apply_linears` is what `vlmkv eval --linears` and benchmarks/experiments/auto_ablation.py both call."""
    from vlmkv.models.cpu_bf16 import apply_linears, bf16_gemm_is_native

    m = nn.Sequential(nn.Linear(4, 4)).to(torch.bfloat16)
    note = apply_linears(m, "native")
    assert note.startswith("note: this CPU has no bf16") if not bf16_gemm_is_native() else note == ""
    assert apply_linears(nn.Linear(4, 4, device="meta").to(torch.bfloat16), "native") == ""  # CPU kernels only
    assert type(m[0]) is nn.Linear  # native changes nothing
    assert apply_linears(m, "fp32").startswith("--linears fp32: 1 linear")
    assert type(m[0]) is Fp32Linear
    with pytest.raises(ValueError, match="for a bfloat16/float16 model on the CPU"):
        apply_linears(nn.Linear(4, 4), "fp32")  # float32: nothing to do, refused
    with pytest.raises(ValueError, match="for a bfloat16/float16 model on the CPU"):
        apply_linears(nn.Linear(4, 4, device="meta").to(torch.bfloat16), "fp32")  # not on the CPU
    with pytest.raises(ValueError, match="mode must be"):
        apply_linears(m, "fp8")
