import pytest

from vlmkv.cli import build_parser, main


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for sub in ("generate", "demo", "inspect", "eval", "make-data", "list", "train-demo"):
        assert sub in out


def test_generate_help_reads_like_readme(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = capsys.readouterr().out
    assert "--method" in out and "--bits" in out and "--prompt" in out


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "kivi" in out and "rtn" in out and "fp16" in out


@pytest.mark.slow
def test_generate_on_embedded_model(smollm2, capsys):
    assert main(["generate", "--model", "smollm2-135m", "--method", "kivi", "--bits", "2",
                 "--prompt", "What is the capital of France?", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "KV cache" in out and "FP16 would be" in out and "tokens/s" in out
    assert "Paris" in out


def test_demo_checks_its_methods_before_the_model_loads(capsys):
    """`vlmkv demo --methods` takes what `vlmkv eval` takes (name:option=value); a bad entry is the error, not a
    model that does not exist."""
    assert main(["demo", "--model", "/no/such/model", "--methods", "fp16,auto:bits=3.0:nope=1"]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "/no/such/model" not in err


def test_option_parsing():
    args = build_parser().parse_args(["generate", "--prompt", "x", "--method", "rtn", "--option", "group_size=32"])
    from vlmkv.cli import _policy_from_args

    p = _policy_from_args(args)
    assert p.group_size == 32


@pytest.mark.slow
def test_inspect_on_smollm2(smollm2, tmp_path, capsys):
    assert main(["inspect", "--model", "smollm2-135m", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "PSA layers" in out
    for f in ("attention_maps.png", "attention_received.png", "attention_report.json", "attention_report.md"):
        assert (tmp_path / f).stat().st_size > 0
    import json

    rep = json.loads((tmp_path / "attention_report.json").read_text())
    assert rep["n_visual"] == 0 and rep["num_layers"] == 30
    # text-only: the modality split is empty, pivots are not (and not only position 0)
    assert any(p and p != [0] for p in rep["pivots"].values())


def test_eval_methods_take_options_after_colons():
    from vlmkv.cli import _method_entry

    assert _method_entry("kivi-2") == "kivi-2"
    label, pol = _method_entry("kivi-2:schedule=blocks:residual_length=64")
    assert label == "kivi-2:schedule=blocks:residual_length=64"
    assert (pol.bits, pol.schedule, pol.residual_length) == (2, "blocks", 64)
    with pytest.raises(ValueError, match="schedule"):
        _method_entry("kivi-2:schedule=paper")
    with pytest.raises(ValueError, match="options for policy"):
        _method_entry("kivi-2:window=3")
