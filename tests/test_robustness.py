"""Bad input, faults and security: nothing runs code from data, corrupt builds are rebuilt, every misuse gets one
clear error naming what was wrong, and the quantizer's edges are the same in every backend."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlmkv import get_policy
from vlmkv.cli import _parse_options, main
from vlmkv.eval.milebench import DatasetError, Sample, load_task, score, score_strict
from vlmkv.eval.synthetic import make_dataset
from vlmkv.models.loading import write_manifest
from vlmkv.quant import QuantSpec, dequantize, quantize


# ------------------------------------------------------------------------------------- nothing runs code from data
class _Planted:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_a_planted_pickle_checkpoint_is_refused_without_running(tmp_path, monkeypatch):
    from vlmkv.models.pocket.train import load_checkpoint, save_checkpoint

    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "checkpoint.pt"
    torch.save({"stage": "text", "step": 1, "seconds": 0.0, "opt": _Planted(), "params": {}}, bad)
    with pytest.raises(ValueError, match="not a checkpoint vlmkv wrote"):
        load_checkpoint(bad)
    assert not (tmp_path / "PWNED").exists()
    good = tmp_path / "ok.pt"
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))])
    save_checkpoint({"stage": "text", "step": 50, "seconds": 1.5, "opt": opt.state_dict(),
                     "params": {"w": torch.ones(3)}}, good)
    state = load_checkpoint(good)
    assert state["step"] == 50 and torch.equal(state["params"]["w"], torch.ones(3))
    assert not good.with_name("ok.pt.tmp").exists()


def test_kernel_folder_others_can_write_is_refused(tmp_path, monkeypatch):
    from vlmkv.kernels import cpu

    monkeypatch.setenv("VLMKV_CACHE", str(tmp_path))
    d = tmp_path / "kernels" / "cpu-x"
    d.mkdir(parents=True)
    (d / f"{cpu.LIBRARY}.so").write_bytes(b"\x7fELF planted")
    write_manifest(d)  # even with a matching manifest: others could have written both
    os.chmod(tmp_path, 0o700)
    os.chmod(tmp_path / "kernels", 0o777)
    with pytest.raises(PermissionError, match="writable by others"):
        cpu._verified(d)
    os.chmod(tmp_path / "kernels", 0o700)
    os.chmod(d, 0o777)
    with pytest.raises(PermissionError, match="writable by others"):
        cpu._verified(d)


def test_corrupt_kernel_is_removed_for_a_rebuild_and_stale_scratch_cleaned(tmp_path, monkeypatch):
    from vlmkv.kernels import cpu

    monkeypatch.setenv("VLMKV_CACHE", str(tmp_path))
    os.chmod(tmp_path, 0o700)
    d = tmp_path / "kernels" / "cpu-x"
    d.mkdir(parents=True, mode=0o700)
    os.chmod(tmp_path / "kernels", 0o700)
    so = d / f"{cpu.LIBRARY}.so"
    so.write_bytes(b"a full library")
    write_manifest(d)
    assert cpu._verified(d) == so
    so.write_bytes(b"a full lib")  # truncated
    with pytest.warns(RuntimeWarning, match="does not match what was built"):
        assert cpu._verified(d) is None
    assert not d.exists()
    stale = tmp_path / "kernels" / "cpu-x.tmp-999999999"
    stale.mkdir()
    cpu._clean_stale(tmp_path / "kernels")
    assert not stale.exists()


def test_a_corrupt_converted_model_is_rebuilt(tmp_path):
    from vlmkv.models.loading import verified, write_manifest

    d = tmp_path / "model"
    d.mkdir()
    (d / "model.safetensors").write_bytes(bytes(range(256)) * 4)
    (d / "config.json").write_text("{}")
    write_manifest(d)
    assert verified(d)
    raw = bytearray((d / "model.safetensors").read_bytes())
    raw[100] ^= 0xFF  # same size, one byte flipped
    (d / "model.safetensors").write_bytes(bytes(raw))
    with pytest.warns(RuntimeWarning, match="does not match what was built"):
        assert not verified(d)
    assert not d.exists()  # removed: the caller rebuilds it


# ------------------------------------------------------------------------------------- data files
def _dataset(tmp_path):
    root = tmp_path / "data"
    make_dataset(root, ["FrameColour"], samples=2, frames=4, seed=0)
    path = root / "FrameColour" / "FrameColour.json"
    return root, path, json.loads(path.read_text())


@pytest.mark.parametrize("fault", ["truncated", "no_data", "no_response", "no_instance", "absolute_image",
                                   "escaping_image", "missing_image", "extra_image", "empty", "duplicate_id"])
def test_bad_data_files_give_one_line_naming_file_and_sample(tmp_path, fault, capsys):
    root, path, raw = _dataset(tmp_path)
    item = raw["data"][1]
    if fault == "truncated":
        path.write_text(path.read_text()[:-40])
    else:
        if fault == "no_data":
            del raw["data"]
        elif fault == "no_response":
            del item["response"]
        elif fault == "no_instance":
            del item["task_instance"]
        elif fault == "absolute_image":
            item["task_instance"]["images_path"][0] = "/etc/passwd"
        elif fault == "escaping_image":
            item["task_instance"]["images_path"][0] = "../../../../etc/passwd"
        elif fault == "missing_image":
            item["task_instance"]["images_path"][0] = "nope.png"
        elif fault == "extra_image":
            item["task_instance"]["images_path"].append(item["task_instance"]["images_path"][0])
        elif fault == "empty":
            raw["data"] = []
        elif fault == "duplicate_id":  # records are keyed by id: --resume would match answers to the wrong clip
            item["sample_id"] = raw["data"][0]["sample_id"]
        path.write_text(json.dumps(raw))
    with pytest.raises(DatasetError) as e:
        load_task(root, "FrameColour")
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg
    if fault == "duplicate_id":
        assert "samples 0 and 1" in msg and repr(item["sample_id"]) in msg
    elif fault not in ("truncated", "no_data", "empty"):
        assert "sample 1" in msg
    # the CLI says it in one line, before any model loads (this model does not exist)
    assert main(["eval", "--model", str(tmp_path / "no-model"), "--data", str(root), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0]


@pytest.mark.parametrize("methods,name", [("fp16,kivy-2", "kivy"), ("rtn-4:group_size=zz", "group_size"),
                                          ("fp16,akvq-vl:nope=1", "nope")])
def test_a_bad_method_is_refused_before_the_model_loads_or_the_output_changes(tmp_path, capsys, methods, name):
    root, _, _ = _dataset(tmp_path)
    out = tmp_path / "o"
    out.mkdir()
    for f, text in (("run.json", '{"model": "m"}'), ("records.jsonl", '{"sample_id": "x"}\n')):
        (out / f).write_text(text)
    # the model does not exist either: the method is what is named, so it was checked first
    assert main(["eval", "--model", str(tmp_path / "no-model"), "--data", str(root), "--methods", methods,
                 "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and name in err[0], err
    assert (out / "run.json").read_text() == '{"model": "m"}'
    assert (out / "records.jsonl").read_text() == '{"sample_id": "x"}\n'
    assert sorted(p.name for p in out.iterdir()) == ["records.jsonl", "run.json"]


def _pickle_file(path: Path) -> Path:
    import pickle

    path.write_bytes(pickle.dumps({"weights": [1.0, 2.0]}))
    return path


@pytest.mark.parametrize("case", ["init_pickle", "init_garbage", "pocket_weights_pickle", "folder_with_only_bin",
                                  "empty_prompt"])
def test_user_errors_are_one_line_saying_what_is_accepted(tmp_path, capsys, monkeypatch, case):
    monkeypatch.setenv("VLMKV_CACHE", str(tmp_path / "cache"))
    if case == "init_pickle":
        argv, want = ["train-demo", "--init", str(_pickle_file(tmp_path / "x.pkl")), "--out", str(tmp_path / "t")], \
            ".safetensors file"
    elif case == "init_garbage":
        (tmp_path / "x.safetensors").write_bytes(b"\xff" * 100)
        argv, want = ["train-demo", "--init", str(tmp_path / "x.safetensors"), "--out", str(tmp_path / "t")], \
            "not a safetensors file"
    elif case == "pocket_weights_pickle":
        monkeypatch.setenv("VLMKV_POCKET_WEIGHTS", str(_pickle_file(tmp_path / "w.pkl")))
        argv, want = ["generate", "--model", "pocket", "--prompt", "hi"], "pickle"
    elif case == "folder_with_only_bin":
        folder = tmp_path / "m"
        folder.mkdir()
        (folder / "config.json").write_text('{"model_type": "llama"}')
        _pickle_file(folder / "pytorch_model.bin")
        argv, want = ["generate", "--model", str(folder), "--prompt", "hi"], "pytorch_model.bin"
    else:
        argv, want = ["generate", "--no-chat", "--prompt", ""], "--prompt must be text"
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and want in err[0], err
    assert not (tmp_path / "t").exists()  # train-demo wrote nothing
    assert not list(tmp_path.rglob("PWNED"))


def test_scoring_reads_whole_options_and_words():
    mc = Sample("T", "1", "", "c", choices=["red", "blue", "green"], answer="blue")
    assert score("I think it is blue", mc) and not score_strict("I think it is blue", mc)  # "I" is no option letter
    assert score("B", mc) and score_strict("B", mc) and score_strict("B. blue", mc) and score_strict("blue", mc)
    assert not score("C", mc) and not score("blue or green", mc)
    frame = Sample("T", "2", "", "c", answer="frame 1")
    assert not score("frame 12", frame) and score("It is frame 1.", frame) and not score_strict("It is frame 1.", frame)
    count = Sample("T", "3", "", "c", answer="3")
    assert not score("23", count) and score("3 frames", count)


def test_eval_output_folder_is_locked_and_resume_needs_the_same_settings(tmp_path):
    from vlmkv.eval.runner import OutputLock, _check_settings, table, Row

    lock = OutputLock(tmp_path, "")
    with pytest.raises(ValueError, match="in use by another vlmkv eval"):
        OutputLock(tmp_path, "")
    lock.release()
    OutputLock(tmp_path, "").release()
    _check_settings(tmp_path, {"max_new_tokens": 8, "model": "m"}, resume=False)
    _check_settings(tmp_path, {"max_new_tokens": 8, "model": "m"}, resume=True)
    with pytest.raises(ValueError, match="max_new_tokens: 8 -> 16"):
        _check_settings(tmp_path, {"max_new_tokens": 16, "model": "m"}, resume=True)
    rows = [Row("fp16", "T", 4, 0.75, 16.0, 1.0, 0.0, 1.0, 0.5)]
    assert "strict" in table(rows) and "0.50" in table(rows)
    assert "strict" not in table([Row("fp16", "T", 4, 0.75, 16.0, 1.0, 0.0, 1.0, 0.75)])


# ------------------------------------------------------------------------------------- options
@pytest.mark.parametrize("name,opts,param", [
    ("rtn", {"bits": 2.0}, "bits"), ("akvq-vl", {"wht": "no"}, "wht"), ("rtn", {"clip_ratio": True}, "clip_ratio"),
    ("akvq-vl", {"pivot_threshold": "2"}, "pivot_threshold"), ("windowquant", {"budget": float("nan")}, "budget"),
    ("windowquant", {"budget": float("inf")}, "budget"), ("windowquant", {"budget": 100}, "budget"),
    ("kivi", {"residual_length": 12.5}, "residual_length")])
def test_misused_options_are_refused_naming_them(name, opts, param):
    with pytest.raises(ValueError, match=param):
        get_policy(name, **opts)


def test_budget_that_the_search_cannot_meet_is_refused_at_construction(tiny_llama):
    from vlmkv import QuantizedKVCache

    # head dim 32 (group 32): 2-bit codes cost 2 + 1 + the slot map's 32 / (2 * 2 * 32) = 3.25 bits per element
    with pytest.raises(ValueError, match="at least 3.250"):
        QuantizedKVCache(tiny_llama, "windowquant", budget=3.2)
    QuantizedKVCache(tiny_llama, "windowquant", budget=3.25).close()
    with pytest.raises(ValueError, match="residual_dtype"):
        QuantizedKVCache(tiny_llama, "rtn-2", residual_dtype=torch.int8)


def test_cli_options_and_arguments():
    assert _parse_options(["wht=no", "pivots=yes", "budget=3.5", "num_pivots=2", "scorer=key_cosine"]) == \
        {"wht": False, "pivots": True, "budget": 3.5, "num_pivots": 2, "scorer": "key_cosine"}
    with pytest.raises(ValueError, match="wht must be bool"):
        get_policy("akvq-vl", **_parse_options(["wht=maybe"]))
    for argv in (["eval", "--limit", "-2"], ["generate", "--prompt", "x", "--temperature", "-1"],
                 ["inspect", "--bin", "0"], ["generate", "--prompt", "x", "--max-new-tokens", "0"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2


def test_cli_model_errors_are_one_clear_line(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["generate", "--model", "/no/such/folder", "--prompt", "x"]) == 2
    assert "not an existing model folder" in capsys.readouterr().err
    assert main(["generate", "--model", "someone/not-downloaded", "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "offline" in err and len(err.strip().splitlines()) == 1


def test_python_dash_m_vlmkv_runs_the_cli():
    r = subprocess.run([sys.executable, "-m", "vlmkv", "list"], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0 and "akvq-vl" in r.stdout and "windowquant" in r.stdout


# ------------------------------------------------------------------------------------- quantizer edges
def _backends():
    from vlmkv.kernels import cpu

    out = ["torch"]
    if cpu.load():
        out.append("cpu")
    return out


@pytest.mark.parametrize("backend", _backends())
def test_quantizer_edges_are_decided_and_the_same_in_every_backend(backend, monkeypatch):
    """NaN / inf groups read back NaN; a 3e5 outlier in fp32 stays finite (the step saturates at fp16's max);
    values near 1e5 with a tiny range come back within |x| / 65534 (the zero point never saturates); fp16 65504
    comes back finite."""
    monkeypatch.setenv("VLMKV_KERNELS", backend)
    spec = QuantSpec(2, group_size=32)
    x = torch.randn(1, 1, 5, 64, generator=torch.Generator().manual_seed(0))
    x[0, 0, 0, 3] = float("nan")
    x[0, 0, 1, 40] = 3e5
    x[0, 0, 2, :32] = 1e5 + torch.rand(32, generator=torch.Generator().manual_seed(1)) * 0.01
    x[0, 0, 3, :32] = float("inf")
    x[0, 0, 4, 32:] = -float("inf")
    q = quantize(x, spec)
    d = dequantize(q)
    assert d[0, 0, 0, :32].isnan().all() and d[0, 0, 0, 32:].isfinite().all()  # only the NaN's group
    assert d[0, 0, 3, :32].isnan().all() and d[0, 0, 4, 32:].isnan().all()
    assert d[0, 0, 1].isfinite().all() and float(d[0, 0, 1, 40]) > 1e5
    assert float((d[0, 0, 2, :32] - x[0, 0, 2, :32]).abs().max()) <= 1e5 / 65534 * 1.01
    monkeypatch.setenv("VLMKV_KERNELS", "torch")
    ref = quantize(x, spec)
    for a, b in ((q.codes, ref.codes), (q.zero, ref.zero)):
        assert torch.equal(a, b)
    assert torch.equal(q.scale.isnan(), ref.scale.isnan()) and torch.equal(q.scale.nan_to_num(), ref.scale.nan_to_num())
    monkeypatch.setenv("VLMKV_KERNELS", backend)
    for bits in (2, 4, 8):
        h = torch.full((1, 1, 2, 32), 65504.0, dtype=torch.float16)
        h[0, 0, 1, ::2] = -65504.0
        back = dequantize(quantize(h, QuantSpec(bits, group_size=32)))
        assert back.isfinite().all() and float(back.max()) <= 65504


@pytest.mark.slow
def test_a_build_killed_midway_leaves_no_compiler_and_its_scratch_is_cleaned(tmp_path):
    """SIGKILL of the process building the CPU kernel: the compiler dies with it (its builder holds
    PR_SET_PDEATHSIG and its own process group), and the next load removes the scratch folder it left."""
    import signal
    import time

    env = dict(os.environ, VLMKV_CACHE=str(tmp_path))
    os.chmod(tmp_path, 0o700)
    p = subprocess.Popen([sys.executable, "-c", "from vlmkv.kernels import cpu; cpu._build(cpu.build_dir())"], env=env)
    # kill once the build's scratch folder exists and its builder has had 2 s to start the compiler (polled, not a
    # fixed sleep: on a loaded machine the import alone can take longer than the old 4 s)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and p.poll() is None and not list((tmp_path / "kernels").glob("*.tmp-*")):
        time.sleep(0.1)
    time.sleep(2)
    assert p.poll() is None, "the build finished before it could be killed"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    time.sleep(3)
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(tmp_path) not in ps, [line for line in ps.splitlines() if str(tmp_path) in line]
    assert list((tmp_path / "kernels").glob("*.tmp-*"))  # left behind by the kill...
    from vlmkv.kernels import cpu

    cpu._clean_stale(tmp_path / "kernels")
    assert not list((tmp_path / "kernels").glob("*.tmp-*"))  # ...and cleaned by the next build
