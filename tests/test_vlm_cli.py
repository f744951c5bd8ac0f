"""A local VLM directory (tiny random LLaVA with SmolLM2's tokenizer and a real LlavaProcessor) through
`load_model` and `vlmkv generate --image`: the path a user with downloaded weights takes."""
import pytest

from vlmkv.cli import main



@pytest.mark.parametrize("method", ["akvq-vl", "windowquant"])
def test_generate_with_images_on_a_local_vlm(local_llava, capsys, method):
    """The CLI path keeps the images' labels: visual tokens are stored below the text width (labels lost would
    store them all at 4 bits for akvq-vl, at 8 for windowquant)."""
    d, img = local_llava
    opts = ["--option", "recent=2"] + (["--option", "budget=6"] if method == "windowquant" else ["--option", "num_pivots=0"])
    assert main(["generate", "--model", str(d), "--method", method, "--image", str(img), "--image", str(img),
                 "--prompt", "What changed between the two frames?", "--max-new-tokens", "4", *opts]) == 0
    out = capsys.readouterr().out
    assert "KV cache" in out and "FP16 would be" in out
    stored = next(line for line in out.splitlines() if line.startswith("stored"))
    assert "2-bit" in stored or (method == "windowquant" and "4-bit" in stored), stored


def test_inspect_with_images_on_a_local_vlm(local_llava, tmp_path, capsys):
    d, img = local_llava
    assert main(["inspect", "--model", str(d), "--image", str(img), "--prompt", "Describe it.", "--out", str(tmp_path)]) == 0
    import json

    rep = json.loads((tmp_path / "attention_report.json").read_text())
    assert rep["n_visual"] == 16
