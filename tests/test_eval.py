import json

import pytest

from vlmkv.cli import main
from vlmkv.eval.milebench import list_tasks, load_task, score, write_task
from vlmkv.eval.synthetic import ANSWER_HINT, TASKS, make_dataset



def test_milebench_round_trip_and_scoring(tmp_path):
    (tmp_path / "T" / "images").mkdir(parents=True)
    for name in ("a.png", "b.png"):
        (tmp_path / "T" / "images" / name).write_bytes(b"")
    write_task(tmp_path, "T", ["Answer."], [
        {"sample_id": 1, "context": "A {image#1} then {image#2}. Which?", "images_path": ["a.png", "b.png"],
         "choice_list": ["red", "blue"], "response": "blue"},
        {"sample_id": 2, "context": "No images here.", "images_path": [], "response": "Paris"},
    ])
    assert list_tasks(tmp_path) == ["T"]
    s1, s2 = load_task(tmp_path, "T")
    kinds = [k for k, _ in s1.segments()]
    assert kinds == ["text", "text", "image", "text", "image", "text", "text"]
    assert s1.images[1].name == "b.png" and s1.instruction == "Answer."
    assert s1.segments()[-1][1].endswith("Answer with the option's letter.")  # MileBench's own prompt
    assert score("B", s1) and score("B. blue", s1) and score("The answer is B", s1) and score("blue", s1)
    assert not score("A", s1) and not score("red", s1) and not score("red or blue", s1)
    assert score("It is Paris.", s2) and not score("London", s2)


def test_synthetic_data_in_milebench_format(tmp_path):
    make_dataset(tmp_path, TASKS, samples=3, frames=6, seed=1)
    assert list_tasks(tmp_path) == sorted(TASKS)
    for t in TASKS:
        raw = json.loads((tmp_path / t / f"{t}.json").read_text())
        assert len(raw["data"]) == 3 and raw["meta_data"]["task_instruction"]
        for s in load_task(tmp_path, t):
            assert len(s.images) == 6 and all(p.exists() for p in s.images)
            assert s.answer in s.choices
            assert s.segments()[-1][1].endswith(ANSWER_HINT)  # the demo VLM answers with the option text
            assert score(f"{'ABCD'[s.choices.index(s.answer)]}.", s)
    # deterministic
    make_dataset(tmp_path / "again", TASKS, samples=3, frames=6, seed=1)
    assert (tmp_path / "Counting" / "Counting.json").read_text() == (tmp_path / "again" / "Counting" / "Counting.json").read_text()


def test_eval_end_to_end_on_a_local_vlm(local_llava, tmp_path, capsys):  # noqa: F811
    d, _ = local_llava
    assert main(["make-data", "--out", str(tmp_path / "data"), "--tasks", "FrameColour,Counting", "--samples", "2",
                 "--frames", "4"]) == 0
    assert main(["eval", "--model", str(d), "--data", str(tmp_path / "data"), "--methods", "fp16,rtn-2",
                 "--limit", "2", "--max-new-tokens", "3", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "| fp16 | Counting | 2 |" in out
    assert "| task | n | chance | majority |" in out and "| FrameColour | 2 | 0.25 |" in out
    rows = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {(r["method"], r["task"]) for r in rows} == {(m, t) for m in ("fp16", "rtn-2") for t in ("Counting", "FrameColour")}
    fp = [r for r in rows if r["method"] == "fp16"]
    assert all(r["kl"] == pytest.approx(0.0, abs=1e-6) and r["top1"] == 1.0 for r in fp)
    assert all(r["bits_per_element"] < 16 for r in rows if r["method"] == "rtn-2")
    assert (tmp_path / "out" / "results.csv").read_text().startswith("method,task,n,accuracy")
    assert (tmp_path / "out" / "accuracy_vs_bits.png").stat().st_size > 0


def test_eval_in_bfloat16_holds_a_16_bit_baseline(local_llava, tmp_path, capsys):  # noqa: F811
    """--dtype bfloat16: the model and its caches run in bf16, the fp16 baseline holds 16 bits an element, and
    the run records its dtype (so --resume will not mix it with a float32 run)."""
    d, _ = local_llava
    main(["make-data", "--out", str(tmp_path / "data"), "--tasks", "FrameColour", "--samples", "1", "--frames", "4"])
    args = ["eval", "--model", str(d), "--data", str(tmp_path / "data"), "--methods", "fp16,auto:bits=4.0",
            "--max-new-tokens", "3", "--out", str(tmp_path / "out")]
    assert main(args + ["--dtype", "bfloat16"]) == 0
    rows = {r["method"]: r for r in json.loads((tmp_path / "out" / "results.json").read_text())}
    assert rows["fp16"]["bits_per_element"] == 16.0 and rows["fp16"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert rows["auto:bits=4.0"]["bits_per_element"] <= 4.0 * 1.02 and rows["auto:bits=4.0"]["kl"] >= 0
    assert json.loads((tmp_path / "out" / "run.json").read_text())["dtype"] == "torch.bfloat16"
    assert main(args + ["--resume"]) != 0  # float32 now: the bf16 answers are not reused
    assert "dtype: 'torch.bfloat16' -> 'torch.float32'" in capsys.readouterr().err


def test_eval_resume_reuses_finished_samples(local_llava, tmp_path, monkeypatch):  # noqa: F811
    """Each (sample, method) result lands in records.jsonl at once; --resume reruns only what is missing."""
    d, _ = local_llava
    data, out = tmp_path / "data", tmp_path / "out"
    main(["make-data", "--out", str(data), "--tasks", "FrameColour", "--samples", "3", "--frames", "4"])
    common = ["eval", "--model", str(d), "--data", str(data), "--max-new-tokens", "2", "--no-fidelity", "--out", str(out)]
    assert main(common + ["--methods", "fp16,rtn-2"]) == 0
    first = json.loads((out / "results.json").read_text())
    lines = (out / "records.jsonl").read_text().splitlines()
    assert len(lines) == 6 and {json.loads(x)["method"] for x in lines} == {"fp16", "rtn-2"}
    # a run stopped mid-way: the last record lost, the one before cut short
    (out / "records.jsonl").write_text("\n".join(lines[:4]) + "\n" + lines[4][:20])
    calls = []
    from vlmkv.eval import runner

    for name in ("_greedy", "greedy_continuation"):  # a method's answer, with or without the shared prefill
        real = getattr(runner, name)
        monkeypatch.setattr(runner, name, lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
    assert main(common + ["--methods", "fp16,rtn-2", "--resume"]) == 0
    assert len(calls) == 2 and json.loads((out / "results.json").read_text()) == first
    assert len((out / "records.jsonl").read_text().splitlines()) == 7  # 4 kept, the cut line, 2 new
    calls.clear()
    assert main(common + ["--methods", "fp16,rtn-2"]) == 0  # without --resume: everything reruns
    assert len(calls) == 6 and len((out / "records.jsonl").read_text().splitlines()) == 6


def _small_eval(local_llava, tmp_path, samples: int, methods: str):
    """(data, out, eval arguments): `samples` FrameColour clips of 4 frames for the tiny LLaVA, fast settings."""
    d, _ = local_llava
    data, out = tmp_path / "data", tmp_path / "out"
    main(["make-data", "--out", str(data), "--tasks", "FrameColour", "--samples", str(samples), "--frames", "4"])
    return data, out, ["eval", "--model", str(d), "--data", str(data), "--max-new-tokens", "2", "--no-fidelity",
                       "--out", str(out), "--methods", methods]


def test_eval_report_only_tabulates_a_stopped_run_without_answering(local_llava, tmp_path, monkeypatch):  # noqa: F811
    """--report-only: the rows of a stopped run from its records, over the clips every method answered; nothing
    runs and no record is written."""
    data, out, common = _small_eval(local_llava, tmp_path, 3, "fp16,rtn-2")
    assert main(common) == 0
    lines = (out / "records.jsonl").read_text().splitlines()
    stopped = "\n".join(lines[:5]) + "\n"  # the third clip answered by fp16 only
    (out / "records.jsonl").write_text(stopped)
    calls = []
    from vlmkv.eval import runner

    for name in ("_greedy", "greedy_continuation", "PromptPrefill"):
        real = getattr(runner, name)
        monkeypatch.setattr(runner, name, lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
    assert main(common + ["--report-only"]) == 0
    assert calls == [] and (out / "records.jsonl").read_text() == stopped
    rows = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["n"]) for r in rows] == [("fp16", 2), ("rtn-2", 2)]
    with pytest.raises(ValueError, match="answer_missing=False reports a stopped run"):
        runner.evaluate(None, None, data, ["FrameColour"], ["fp16"], answer_missing=False)
    # other settings than the records': refused as --resume refuses them
    assert main(common[:-2] + ["--methods", "fp16,rtn-4", "--report-only"]) == 2


def test_resumed_processes_split_what_is_left_evenly():
    """Under N processes each sample runs once; on resume the unanswered ones are dealt out evenly, even when one
    process's former share is all that is left."""
    from types import SimpleNamespace

    from vlmkv.eval.runner import _share

    samples = [SimpleNamespace(task="T", sample_id=str(k)) for k in range(10)]
    done = {("T", str(k), m): {} for k in range(5) for m in ("a", "b")}  # the first half fully answered
    done[("T", "7", "a")] = {}  # one method of sample 7 only: it still runs
    shares = [_share(samples, ["a", "b"], done, k, 2) for k in range(2)]
    assert sorted(shares[0] + shares[1]) == list(range(10))
    left = {5, 6, 7, 8, 9}
    assert [len(set(x) & left) for x in shares] == [3, 2]
    assert _share(samples, ["a"], {}, 0, 1) == list(range(10))


def test_eval_writes_held_out_clips_when_no_data_is_given(local_llava, tmp_path, capsys):  # noqa: F811
    d, _ = local_llava
    assert main(["eval", "--model", str(d), "--methods", "fp16", "--tasks", "WhichFrame", "--limit", "1",
                 "--max-new-tokens", "2", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "data-synthetic-1" / "WhichFrame" / "WhichFrame.json").exists()
    assert "| fp16 | WhichFrame | 1 |" in capsys.readouterr().out


def test_presets_and_sweep_end_to_end(local_llava, tmp_path, capsys):  # noqa: F811
    d, _ = local_llava
    data = tmp_path / "data"
    main(["make-data", "--out", str(data), "--tasks", "StateChange", "--samples", "2", "--frames", "4"])
    assert main(["eval", "--model", str(d), "--data", str(data), "--preset", "akvq-ablation", "--limit", "2",
                 "--max-new-tokens", "2", "--out", str(tmp_path / "abl"), "--methods", "kivi-2"]) == 0
    out = capsys.readouterr().out
    assert "+ Adaptive quantization based on PSA" in out and "| Delta |" in out
    assert "| kivi-2 |" in out  # --methods adds to the preset
    assert main(["eval", "--model", str(d), "--data", str(data), "--preset", "akvq-table2", "--limit", "2",
                 "--max-new-tokens", "2", "--out", str(tmp_path / "t2")]) == 0
    t2 = capsys.readouterr().out.split("| Method | Bits (from bytes) |")[1].splitlines()
    assert t2[0].endswith("| lost / gained vs FP16 |") and t2[2].startswith("| FP16 |") and t2[2].endswith("| 0 / 0 |")
    assert main(["eval", "--model", str(d), "--data", str(data), "--sweep", "pivots=0,5", "--limit", "2",
                 "--max-new-tokens", "2", "--out", str(tmp_path / "sw")]) == 0
    csv_text = (tmp_path / "sw" / "sweep_num_pivots" / "results.csv").read_text().splitlines()
    assert csv_text[0].startswith("method,task") and len(csv_text) == 3
    assert (tmp_path / "sw" / "sweep_num_pivots" / "sweep_num_pivots.png").stat().st_size > 0


def test_sweep_parsing_and_table2_layout():
    from vlmkv.eval.presets import parse_sweep, preset_methods, table2_markdown
    from vlmkv.eval.runner import Row

    assert parse_sweep("clip=0.6:1.0:0.1") == ("low_clip", [0.6, 0.7, 0.8, 0.9, 1.0])
    assert parse_sweep("recent=0,32,64") == ("recent", [0, 32, 64])
    assert [l for l, _ in preset_methods("akvq-table2")] == ["FP16", "RTN (INT4)", "RTN (INT2)", "SmoothQuant", "KIVI",
                                                             "SKVQ", "AKVQ-VL"]
    md = table2_markdown([Row("FP16", "OE", 2, 0.5, 32.0, 1.0, 0.0, 1.0), Row("FP16", "ST", 2, 1.0, 32.0, 1.0, 0.0, 1.0),
                          Row("rtn-2", "OE", 2, 0.5, 2.5, 0.1, 0.2, 0.5), Row("rtn-2", "ST", 2, 0.0, 2.5, 0.1, 0.4, 0.5)])
    assert "| FP16 | 32.00 | 50.0 | 100.0 | 0.750 | 100.0% | 0.0000 | 1.000 |" in md
    assert "| rtn-2 | 2.50 | 50.0 | 0.0 | 0.250 | 33.3% | 0.3000 | 0.500 |" in md
    nan = float("nan")  # --no-fidelity: no KL to average
    assert "| 0.500 | - | - | - |" in table2_markdown([Row("x", "OE", 1, 0.5, 3.0, 1.0, nan, nan)])
    with pytest.raises(ValueError, match="sweep"):
        parse_sweep("nope=1,2")


def test_table2_lost_and_gained_against_fp16_clip_by_clip():
    """answer_flips counts, per method, clips FP16 got right and it got wrong (lost) and the reverse (gained); records
    that are not the table's clips (another --limit, a stopped run) give no column rather than other clips' counts."""
    from vlmkv.eval.presets import answer_flips, table2_markdown
    from vlmkv.eval.runner import Row

    right = {("T", "T_0"): (True, False, True), ("T", "T_1"): (False, True, True), ("T", "T_2"): (True, True, False)}
    records = {(t, s, m): {"correct": ok} for (t, s), oks in right.items() for m, ok in zip(("FP16", "rtn-2", "auto"), oks)}
    rows = [Row(m, "T", 3, a, b, 1.0, 0.0, 1.0) for m, a, b in (("FP16", 2 / 3, 16.0), ("rtn-2", 2 / 3, 2.5),
                                                                 ("auto", 2 / 3, 3.0))]
    flips = answer_flips(records, rows)
    assert flips == {"FP16": (0, 0), "rtn-2": (1, 1), "auto": (1, 1)}
    assert table2_markdown(rows, flips).splitlines()[3].endswith("| 1 / 1 |")
    assert "lost / gained" not in table2_markdown(rows)
    assert answer_flips(records, [Row("FP16", "T", 4, 0.5, 16.0, 1.0, 0.0, 1.0)]) is None  # 3 records, 4 clips
    assert answer_flips(records, [Row("FP16", "T", 3, 1.0, 16.0, 1.0, 0.0, 1.0)]) is None  # rows rescored: 3 right, not 2
    assert answer_flips({k: v for k, v in records.items() if k[2] != "FP16"}, rows[1:]) is None  # no FP16


@pytest.mark.slow
def test_eval_data_parallel_with_accelerate_on_two_cpu_processes(local_llava, tmp_path):  # noqa: F811
    """`accelerate launch --num_processes 2 --cpu` splits the samples between processes and gathers them:
    the table equals a single-process run's."""
    import os
    import subprocess
    import sys

    d, _ = local_llava
    data = tmp_path / "data"
    main(["make-data", "--out", str(data), "--tasks", "FrameColour", "--samples", "4", "--frames", "4"])
    common = ["eval", "--model", str(d), "--data", str(data), "--methods", "fp16,rtn-2", "--max-new-tokens", "2"]
    main(common + ["--out", str(tmp_path / "single")])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # on a machine without CUDA, --multi_gpu starts CPU processes (torchrun + gloo)
    import socket

    with socket.socket() as sock:  # a free port for the process group, not accelerate's fixed 29500
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                        "--main_process_port", str(port), "-m", "vlmkv.cli", *common, "--out", str(tmp_path / "dp")],
                       capture_output=True, text=True, env=env, timeout=600)
    # on failure, show what the ranks printed (their own errors come before the launcher's summary)
    assert r.returncode == 0, "\n".join(l for l in r.stderr.splitlines() if "Warning" not in l)[-6000:]
    # two processes really ran, each on its half of the samples (one records file each)
    shares = [len((tmp_path / "dp" / f"records.rank{k}.jsonl").read_text().splitlines()) for k in (0, 1)]
    assert shares == [4, 4], shares  # 2 samples x 2 methods each
    single = json.loads((tmp_path / "single" / "results.json").read_text())
    dp = json.loads((tmp_path / "dp" / "results.json").read_text())
    assert [(x["method"], x["task"], x["n"]) for x in dp] == [(x["method"], x["task"], x["n"]) for x in single]
    assert all(x["n"] == 4 for x in dp)
    for a, b in zip(single, dp):
        assert a["accuracy"] == b["accuracy"] and abs(a["kl"] - b["kl"]) < 1e-5


def test_eval_path_keeps_the_images_labels(local_llava, tmp_path):
    """Through `evaluate` (the eval CLI's engine), akvq-vl stores visual tokens at 2 bits: with the labels lost it
    would hold them at its text width, 4 bits, as akvq-vl with low_bits=4 does."""
    from vlmkv import get_policy
    from vlmkv.eval.runner import evaluate
    from vlmkv.models.loading import load_model

    d, _ = local_llava
    model, proc = load_model(str(d))
    main(["make-data", "--out", str(tmp_path / "data"), "--tasks", "FrameColour", "--samples", "2", "--frames", "4"])
    answers = []
    evaluate(model, proc, tmp_path / "data", ["FrameColour"],
             [("akvq", get_policy("akvq-vl", recent=2, num_pivots=0, group_size=32)),
              # what lost labels would store: every token at akvq-vl's text width
              ("akvq4", get_policy("akvq-vl", recent=2, num_pivots=0, group_size=32, low_bits=4))],
             max_new_tokens=2, fidelity=False, answers=answers)
    bits = {m: sum(a["bits"] for a in answers if a["method"] == m) / 2 for m in ("akvq", "akvq4")}
    assert bits["akvq"] < bits["akvq4"] - 0.2, bits  # the same bytes when the labels are lost


def test_synthetic_yes_no_tasks_are_balanced():
    """StateChange and ObjectExistence answer "yes" about half the time, so a constant answer stays near 0.5."""
    import random

    from vlmkv.eval.synthetic import sample_clip

    for task in ("StateChange", "ObjectExistence"):
        rng = random.Random(3)
        yes = sum(sample_clip(rng, task)[3] == "yes" for _ in range(400)) / 400
        assert 0.42 < yes < 0.58, (task, yes)


def test_which_frame_question_survives_repeated_frames():
    """A clip whose frames mostly repeat one content still gets a question (fewer options), never a crash."""
    import random

    from vlmkv.eval.synthetic import make_question

    clip = [("red", "circle")] * 6 + [("blue", "square"), ("green", "triangle")]
    for seed in range(20):
        q, choices, ans = make_question("WhichFrame", clip, random.Random(seed))
        assert ans in choices and len(set(choices)) == len(choices) and 1 <= len(choices) <= 4


def test_object_existence_stays_balanced_on_long_clips():
    """With 32+ frames every colour-shape pair tends to appear; a "no" question takes one out of the clip."""
    import random

    from vlmkv.eval.synthetic import sample_clip

    rng = random.Random(0)
    answers = []
    for _ in range(200):
        clip, q, _, ans = sample_clip(rng, "ObjectExistence", 64)
        words = q.split()
        pair = (words[2], words[3])
        assert (pair in clip) == (ans == "yes"), (q, ans)
        answers.append(ans)
    assert 0.4 < answers.count("yes") / 200 < 0.6


def test_pareto_sweeps_knobs_and_finds_the_fewest_bits(local_llava, tmp_path, capsys):
    from vlmkv.eval import presets
    from vlmkv.eval.runner import Row

    rows = [Row("FP16", "T", 10, 1.0, 32.0, 1.0, 0.0, 1.0), Row("auto bits=3.0", "T", 10, 0.9, 3.0, 1.0, 0.5, 0.5),
            Row("auto bits=6.0", "T", 10, 1.0, 6.0, 1.0, 0.01, 1.0), Row("rtn-2 g32 none", "T", 10, 0.5, 2.5, 1.0, 2.0, 0.2)]
    md = presets.fewest_bits_markdown(rows)
    assert "| auto | 6.00 | auto bits=6.0 |" in md and "| rtn | - |" in md
    with pytest.raises(ValueError, match="pareto families"):
        presets.pareto_methods(["nope"])
    d, _ = local_llava
    main(["make-data", "--out", str(tmp_path / "data"), "--tasks", "FrameColour", "--samples", "1", "--frames", "4"])
    assert main(["eval", "--model", str(d), "--data", str(tmp_path / "data"), "--pareto", "auto,kivi", "--limit", "1",
                 "--max-new-tokens", "2", "--no-fidelity", "--out", str(tmp_path / "p")]) == 0
    err = capsys.readouterr().err
    assert "auto bits=2.5 left out" in err  # head_dim 16: 2-bit codes with their scales cost more than 2.5
    assert (tmp_path / "p" / "pareto.png").stat().st_size > 0
    assert "| kivi |" in (tmp_path / "p" / "fewest_bits.md").read_text()


@pytest.mark.parametrize("method", ["fp16", "rtn-2", "kivi-2", "akvq-vl"])
def test_greedy_logits_equal_teacher_forced_on_the_same_path(local_llava, tmp_path, method):  # noqa: F811
    """The eval reads a method's KL off its own greedy run when it followed fp16's tokens: those logits must be
    the ones teacher-forcing the same tokens gives (same cache, same inputs); off the path it must teacher-force."""
    import torch

    from vlmkv import QuantizedKVCache, get_policy
    from vlmkv.eval.fidelity import teacher_forced_logits
    from vlmkv.eval.milebench import load_task
    from vlmkv.eval.runner import _forced_from_greedy, _greedy, build_sample_inputs
    from vlmkv.models.loading import load_model

    d, _ = local_llava
    model, proc = load_model(str(d))
    main(["make-data", "--out", str(tmp_path / "data"), "--tasks", "WhichFrame", "--samples", "1", "--frames", "4"])
    inp = build_sample_inputs(proc, load_task(tmp_path / "data", "WhichFrame")[0])
    extra = {k: v for k, v in inp.items() if k not in ("input_ids", "attention_mask")}
    pol = get_policy(method, **({"recent": 2, "num_pivots": 1, "group_size": 32} if method == "akvq-vl" else {}))
    with QuantizedKVCache(model, pol, tokenizer=proc.tokenizer) as c:
        new, lg = _greedy(model, inp, c, 5, proc.tokenizer, min_new_tokens=5)
    with QuantizedKVCache(model, pol, tokenizer=proc.tokenizer) as c:
        forced = teacher_forced_logits(model, inp["input_ids"], inp["attention_mask"], c, new, **extra)
    got = _forced_from_greedy(new, lg, new)
    assert got is not None and got.shape == forced.shape == (1, 5, lg.shape[-1])
    scale = forced.abs().max()
    torch.testing.assert_close(got, forced, rtol=0, atol=1e-5 * float(scale))
    other = new.clone()
    other[0, 0] += 1
    assert _forced_from_greedy(new, lg, other) is None  # left the path at the first token
    assert _forced_from_greedy(new[:, :3], lg[:, :3], new) is None  # stopped before the end


def test_pareto_families_of_method_labels():
    """Sweep labels and `--methods` labels with options both fall into their method's family (one plot line)."""
    from vlmkv.eval.presets import _family

    assert _family("kivi-2 r32") == "kivi" and _family("auto bits=2.5") == "auto"
    assert _family("auto:bits=3.0") == "auto" and _family("akvq-vl:recent=0") == "akvq-vl" and _family("fp16") == "fp16"
    # Table II's labels and bits shorthand join the same lines as the sweep's points
    assert [_family(x) for x in ("RTN (INT4)", "rtn-2", "rtn-4:group_size=32", "SmoothQuant", "AKVQ-VL", "FP16")] \
        == ["rtn", "rtn", "rtn", "smoothquant", "akvq-vl", "fp16"]


def test_pareto_from_finished_runs(tmp_path):
    """benchmarks/pareto_from_results.py: a Table II run's labels (FP16 upper-case or not) give the plot and table."""
    import importlib.util
    import json
    from dataclasses import asdict
    from pathlib import Path

    from vlmkv.eval.runner import Row

    spec = importlib.util.spec_from_file_location("pfr", Path(__file__).parents[1] / "benchmarks" / "pareto_from_results.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = [Row("fp16", "T", 4, 0.5, 16.0, 1.0, 0.0, 1.0), Row("RTN (INT4)", "T", 4, 0.5, 4.8, 1.0, 0.01, 1.0),
            Row("rtn-2", "T", 4, 0.25, 2.6, 1.0, 1.0, 0.5), Row("auto:bits=3.0", "T", 4, 0.25, 3.0, 1.0, 0.1, 0.9)]
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "results.json").write_text(json.dumps([asdict(r) for r in rows]))
    assert mod.main([str(tmp_path / "r")]) == 0
    md = (tmp_path / "r" / "fewest_bits.md").read_text()
    assert "| rtn | 4.80 | RTN (INT4) |" in md and "| auto | - |" in md and "FP16: mean accuracy 0.500 (4 answers)" in md
    assert (tmp_path / "r" / "pareto.png").stat().st_size > 0
    assert "| RTN (INT4) | 4.80 | 50.0 | 0.500 | 100.0% |" in (tmp_path / "r" / "table2.md").read_text()
    with pytest.raises(SystemExit, match="no results.json"):
        mod.main([str(tmp_path / "nothing")])


def test_pareto_from_results_merges_a_rerun_only_on_the_same_clips(tmp_path):
    """--replace-from: a rerun method replaces the row of the same label, FP16 stays the base's; runs of other
    settings, or whose FP16 answers differ on a shared clip, are refused (not the same experiment)."""
    import importlib.util
    from dataclasses import asdict
    from pathlib import Path

    from vlmkv.eval.runner import Row

    spec = importlib.util.spec_from_file_location("pfr", Path(__file__).parents[1] / "benchmarks" / "pareto_from_results.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def run(name, rows, fp16_answer, **cfg):
        d = tmp_path / name
        d.mkdir()
        (d / "results.json").write_text(json.dumps([asdict(r) for r in rows]))
        (d / "run.json").write_text(json.dumps({"model": "m", "data": "d", "dtype": "bf16", **cfg}))
        rec = {"sample_id": "T_0", "task": "T", "method": rows[0].method, "answer": fp16_answer}
        (d / "records.rank0.jsonl").write_text(json.dumps(rec) + "\n")
        return str(d)

    base = run("base", [Row("FP16", "T", 4, 0.5, 16.0, 1.0, 0.0, 1.0), Row("auto:bits=3.0", "T", 4, 0.25, 3.0, 1.0, 0.1, 0.9),
                        Row("KIVI", "T", 4, 0.5, 3.9, 1.0, 0.05, 0.9)], "frame 2")
    rerun = run("rerun", [Row("fp16", "T", 4, 0.5, 16.0, 1.0, 0.0, 1.0),
                          Row("auto:bits=3.0", "T", 4, 0.5, 3.0, 1.0, 0.01, 1.0)], "frame 2")
    assert mod.main([base, "--replace-from", rerun, "--out", str(tmp_path / "m")]) == 0
    merged = json.loads((tmp_path / "m" / "results.json").read_text())
    assert [(r["method"], r["accuracy"]) for r in merged] == [("FP16", 0.5), ("KIVI", 0.5), ("auto:bits=3.0", 0.5)]
    assert "| auto | 3.00 | auto:bits=3.0 |" in (tmp_path / "m" / "fewest_bits.md").read_text()
    assert "| auto:bits=3.0 | 3.00 |" in (tmp_path / "m" / "table2.md").read_text()
    other = run("other", [Row("fp16", "T", 4, 0.5, 16.0, 1.0, 0.0, 1.0)], "frame 3")
    with pytest.raises(SystemExit, match="FP16 answers differ on 1 of 1"):
        mod.main([base, "--replace-from", other, "--out", str(tmp_path / "m2")])
    bf = run("bf", [Row("fp16", "T", 4, 0.5, 16.0, 1.0, 0.0, 1.0)], "frame 2", linears="float32")
    with pytest.raises(SystemExit, match="same settings"):
        mod.main([base, "--replace-from", bf, "--out", str(tmp_path / "m3")])
    with pytest.raises(SystemExit):  # merging needs one base run and a destination
        mod.main([base, rerun, "--replace-from", rerun])


def test_eval_resume_refuses_records_of_an_older_plan(local_llava, tmp_path, monkeypatch):  # noqa: F811
    """A policy whose plan changed under the same options (`Policy.revision`) describes itself differently, so
    --resume refuses the old records instead of mixing the two plans in one row."""
    from vlmkv.policies.rtn import RTNPolicy

    _, out, common = _small_eval(local_llava, tmp_path, 1, "fp16,rtn:bits=2")
    assert main(common) == 0
    monkeypatch.setattr(RTNPolicy, "revision", 1)
    assert main(common + ["--resume"]) == 2
    assert main(common) == 0  # a fresh run (no --resume) starts over under the new plan
    assert json.loads((out / "run.json").read_text())["methods"]["rtn:bits=2"].endswith(")@r1")


def test_answer_errors_reads_the_regenerated_clips(tmp_path, capsys):
    """benchmarks/experiments/answer_errors.py: Counting's signed errors and near-option split, what a WhichFrame miss shares
    with the asked frame, from clips remade with make-data's seed; a wrong seed or foreign records are refused."""
    import importlib.util
    import random
    from collections import Counter
    from pathlib import Path

    from vlmkv.eval.runner import load_samples
    from vlmkv.eval.synthetic import make_dataset, sample_clip

    spec = importlib.util.spec_from_file_location("ae", Path(__file__).parents[1] / "benchmarks" / "experiments" / "answer_errors.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    data, run = tmp_path / "data", tmp_path / "run"
    make_dataset(data, tasks=("Counting", "WhichFrame"), samples=6, frames=6, seed=4)
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"data": str(data)}))
    rng = random.Random("4-WhichFrame")
    clips = [sample_clip(rng, "WhichFrame", 6)[0] for _ in range(6)]
    recs = []
    for task in ("Counting", "WhichFrame"):
        for i, smp in enumerate(load_samples(data, [task])):
            wrong = next(c for c in smp.choices if c != smp.answer)
            ans = smp.answer if i % 2 else wrong  # even clips answered wrong
            recs.append({"task": task, "sample_id": smp.sample_id, "method": "fp16", "answer": ans, "truth": smp.answer,
                         "correct": ans == smp.answer})
    (run / "records.rank0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert mod.main([str(run), "--data", str(data), "--seed", "4"]) == 0
    rep = json.loads(capsys.readouterr().out)
    count = [r for r in recs if r["task"] == "Counting"]
    errors = Counter(int(r["answer"]) - int(r["truth"]) for r in count)
    assert rep["Counting"]["signed_error"] == {str(k): v for k, v in sorted(errors.items())}
    near = rep["Counting"]["accuracy_with_a_wrong_option_within_2"]["clips"] + rep["Counting"]["accuracy_without"]["clips"]
    assert near == 6 and rep["WhichFrame"]["misses"] == 3
    expect = Counter()
    for r in recs:
        if r["task"] == "WhichFrame" and not r["correct"]:
            clip = clips[int(r["sample_id"].split("_")[1])]
            a, g = clip[int(r["truth"].split()[1]) - 1], clip[int(r["answer"].split()[1]) - 1]
            expect["colour" if a[0] == g[0] else "shape" if a[1] == g[1] else "neither"] += 1
    assert rep["WhichFrame"]["the chosen frame shares"] == dict(expect)
    with pytest.raises(ValueError, match="seed 5 does not remake"):
        mod.main([str(run), "--data", str(data), "--seed", "5"])
    (run / "run.json").write_text(json.dumps({"data": str(tmp_path / "other")}))
    with pytest.raises(SystemExit, match="not --data"):
        mod.main([str(run), "--data", str(data), "--seed", "4"])


def test_paired_answers_compares_the_same_clips(tmp_path):
    """benchmarks/experiments/paired_answers.py: only clips both runs answered, lost and gained per task; runs of other data
    or another dtype are refused."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("pa", Path(__file__).parents[1] / "benchmarks" / "experiments" / "paired_answers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    runs = {"a": ("FP16", {"C_0": True, "C_1": False, "C_2": True, "C_3": True}),
            "b": ("fp16", {"C_0": False, "C_1": True, "C_2": True})}  # b stopped before C_3
    for d, (label, answers) in runs.items():
        (tmp_path / d).mkdir()
        (tmp_path / d / "run.json").write_text(json.dumps({"data": "D", "dtype": "bf16", "max_new_tokens": 6}))
        (tmp_path / d / "records.rank0.jsonl").write_text("".join(
            json.dumps({"task": "C", "sample_id": s, "method": label, "correct": ok}) + "\n" for s, ok in answers.items()))
    res = mod.paired(mod.load_records(tmp_path / "a"), mod.load_records(tmp_path / "b"), "FP16", "fp16")
    assert res == {"C": {"clips": 3, "first": 2, "second": 2, "lost": 1, "gained": 1}}
    assert mod.main([str(tmp_path / "a"), str(tmp_path / "b"), "--second-method", "fp16"]) == 0
    (tmp_path / "b" / "run.json").write_text(json.dumps({"data": "D", "dtype": "fp32", "max_new_tokens": 6}))
    with pytest.raises(SystemExit, match="dtype"):
        mod.main([str(tmp_path / "a"), str(tmp_path / "b"), "--second-method", "fp16"])
