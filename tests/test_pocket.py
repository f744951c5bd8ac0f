"""The pocket demo VLM: LoRA merge, loading from the committed weights, accuracy above the majority baseline
(a smoke check; the full table is in docs/RESULTS.md), the training script end to end, and `vlmkv demo`."""
import copy
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn

from vlmkv.models.pocket.lora import LoRALinear, add_lora, load_lora, lora_state, merge_lora, strip_lora


def test_lora_forward_equals_merged_weights():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 5))
    ref = [m.weight.detach().clone() for m in (net[0], net[2])]
    names = add_lora(net, ("0", "2"), r=4, alpha=8)
    assert names == ["0", "2"] and isinstance(net[0], LoRALinear)
    x = torch.randn(3, 12)
    with torch.no_grad():
        for m in (net[0], net[2]):
            m.lora_B.normal_()
    y = net(x)
    state = lora_state(net)
    plain = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 5))
    with torch.no_grad():
        for dst, src, w in zip((plain[0], plain[2]), (net[0], net[2]), ref):
            dst.weight.copy_(w)
            dst.bias.copy_(src.base.bias)
    assert merge_lora(plain, state) == 2
    torch.testing.assert_close(plain(x), y, rtol=1e-5, atol=1e-5)
    strip_lora(net)
    assert isinstance(net[0], nn.Linear)
    torch.testing.assert_close(net(x), y, rtol=1e-5, atol=1e-5)


def test_lora_rejects_bad_input():
    with pytest.raises(ValueError, match="targets"):
        add_lora(nn.Sequential(nn.Linear(2, 2)), ("q_proj",))
    with pytest.raises(ValueError, match="r must"):
        LoRALinear(nn.Linear(2, 2), r=0, alpha=1)
    with pytest.raises(ValueError, match="linear"):
        merge_lora(nn.Sequential(nn.ReLU()), {"0.lora_A": torch.zeros(1, 1), "0.lora_B": torch.zeros(1, 1)})


def test_load_lora_widens_a_smaller_adapter_without_changing_the_layer():
    """`train-demo --init W --lora-r R` with R above W's rank: the model starts computing exactly what W did."""
    torch.manual_seed(0)
    small = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 5))
    big, same = copy.deepcopy(small), copy.deepcopy(small)
    add_lora(small, ("0", "2"), r=2, alpha=4)
    add_lora(big, ("0", "2"), r=6, alpha=12)
    with torch.no_grad():
        for m in (small[0], small[2]):
            m.lora_B.normal_()
    x = torch.randn(4, 12)
    assert load_lora(big, lora_state(small)) == 2
    torch.testing.assert_close(big(x), small(x), rtol=1e-5, atol=1e-6)
    assert big[0].lora_A[2:].abs().sum() > 0  # the new ranks start random in A, zero in B: they can learn
    assert big[0].lora_B[:, 2:].abs().sum() == 0
    add_lora(same, ("0", "2"), r=2, alpha=4)
    load_lora(same, lora_state(small))
    torch.testing.assert_close(same(x), small(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="rank at most 2"):
        load_lora(same, lora_state(big))
    with pytest.raises(ValueError, match="every adapted layer"):
        load_lora(same, {k: v for k, v in lora_state(small).items() if not k.startswith("2.")})


@pytest.fixture(scope="module")
def pocket():
    import vlmkv

    return vlmkv.load_model("pocket")


@pytest.mark.slow
def test_pocket_loads_offline_as_a_llava(pocket):
    from vlmkv.models.modality import adapter_for
    from vlmkv.models.pocket import TOKENS_PER_FRAME

    model, proc = pocket
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert adapter_for(model.config, proc.tokenizer).tokens_per_image == TOKENS_PER_FRAME == 16


@pytest.mark.slow
def test_pocket_long_is_its_own_model(monkeypatch):
    """`pocket-long` assembles from its own committed weights (never $VLMKV_POCKET_WEIGHTS, which is pocket's)."""
    from vlmkv.models.loading import resolve
    from vlmkv.models.pocket.model import WEIGHTS, WEIGHTS_LONG, weights_digest

    monkeypatch.setenv("VLMKV_POCKET_WEIGHTS", str(WEIGHTS))
    path, _ = resolve("pocket-long")
    meta = json.loads((Path(path) / "vlmkv_pocket.json").read_text())
    assert meta["digest"] == weights_digest(WEIGHTS_LONG) != weights_digest(WEIGHTS)
    assert Path(resolve("pocket")[0]).name == f"pocket-{weights_digest(WEIGHTS)}"


@pytest.mark.slow
def test_pocket_beats_the_majority_baseline_in_fp16(pocket, tmp_path):
    from vlmkv.eval.runner import evaluate
    from vlmkv.eval.synthetic import make_dataset

    model, proc = pocket
    tasks = ["FrameColour", "WhichFrame"]
    make_dataset(tmp_path, tasks, samples=8, frames=8, seed=11)
    answers = []
    evaluate(model, proc, tmp_path, tasks, ["fp16"], answers=answers, max_new_tokens=4)
    acc = sum(a["correct"] for a in answers) / len(answers)
    # majority baseline with hindsight: the most frequent true answer of each task on this very set
    majority = sum(Counter(a["truth"] for a in answers if a["task"] == t).most_common(1)[0][1] for t in tasks) / len(answers)
    assert acc > majority, (acc, majority, answers)


def _transformers_before(*version) -> bool:
    import transformers

    return tuple(int(x) for x in transformers.__version__.split(".")[:2]) < version


@pytest.mark.slow
@pytest.mark.skipif(_transformers_before(5, 1), reason="under transformers 5.0 the pocket batch tokenizes the word form one "
                    "token longer than the image form: pocket's training layout needs a newer release")
def test_words_stage_shares_the_image_layout():
    """Stage 1's word form puts each frame's 16 words exactly where the processor puts its 16 visual
    tokens, and `align` regresses those visual tokens onto the embeddings of the same words."""
    import random

    from vlmkv.models.pocket.config import TrainConfig
    from vlmkv.models.pocket.model import TOKENS_PER_FRAME, build_untrained
    from vlmkv.models.pocket.train import _align_targets, make_batch

    model, proc = build_untrained()
    cfg = TrainConfig(batch=3, questions=2)
    words, lw, rw = make_batch(proc, random.Random(5), cfg, as_words=True)
    images, li, ri = make_batch(proc, random.Random(5), cfg, as_words=False)
    assert rw == ri and words["input_ids"].shape == images["input_ids"].shape
    torch.testing.assert_close(words["attention_mask"], images["attention_mask"])
    torch.testing.assert_close(lw, li)
    img = images["input_ids"] == proc.tokenizer.convert_tokens_to_ids("<image>")
    assert int(img.sum()) == 3 * cfg.frames * TOKENS_PER_FRAME
    assert torch.equal(words["input_ids"][~img], images["input_ids"][~img])
    emb = model.model.language_model.embed_tokens.weight
    frames = [f for _, clip, _, _ in rw for f in clip]
    assert torch.equal(emb[words["input_ids"][img]].view(len(frames), TOKENS_PER_FRAME, -1),
                       _align_targets(model, proc, frames))


def test_curriculum_levels_and_batches():
    """The long-clip curriculum: FRAMES:STEPS levels rising from the base length, batches of about equal tokens."""
    from vlmkv.models.pocket.config import TrainConfig, curriculum_levels
    from vlmkv.models.pocket.train import at_length

    assert curriculum_levels("16:60, 32:80,64:120", 8) == [(16, 60), (32, 80), (64, 120)]
    assert curriculum_levels("") == []
    for bad in ("16", "16:0", "8:10", "32:10,16:10", "a:b"):
        with pytest.raises(ValueError, match="curriculum"):
            TrainConfig(curriculum=bad)
    cfg = TrainConfig(batch=8, frames=8, curriculum="16:1,64:1")
    assert [(c.frames, c.batch, c.curriculum) for c in (at_length(cfg, 16), at_length(cfg, 64), at_length(cfg, 128))] \
        == [(16, 4, ""), (64, 1, ""), (128, 1, "")]


@pytest.mark.parametrize("flag, bf16", [([], None), (["--precision", "auto"], None), (["--precision", "bf16"], True),
                                        (["--precision", "fp32"], False)])
def test_train_demo_precision_flag(monkeypatch, tmp_path, flag, bf16):
    """`train-demo --precision` reaches TrainConfig.bf16 (None: bf16 only where the CPU computes it natively,
    resolved and recorded by `train`); a bf16 value other than True/False/None is refused."""
    import vlmkv.models.pocket.train as T
    from vlmkv.cli import main
    from vlmkv.models.pocket.config import TrainConfig

    seen = []
    monkeypatch.setattr(T, "train", lambda cfg: seen.append(cfg) or {"stages": {}})
    assert main(["train-demo", "--out", str(tmp_path)] + flag) == 0
    assert seen[0].bf16 is bf16
    with pytest.raises(ValueError, match="bf16"):
        TrainConfig(bf16="yes")


def test_task_mix_weights_the_draws(pocket):
    """`mix` draws named tasks more often, for first questions and follow-ups; bad weights are refused."""
    import random
    from collections import Counter

    from vlmkv.models.pocket.config import TrainConfig, task_weights
    from vlmkv.models.pocket.train import make_batch

    tasks = ("ObjectExistence", "FrameColour", "WhichFrame", "Counting")
    assert task_weights("", tasks) is None
    assert task_weights("Counting=3, WhichFrame=0.5", tasks) == [1.0, 1.0, 0.5, 3.0]
    for bad in ("Counting", "Counting=-1", "Counting=inf", "StateChange=2", "Counting=x",
                "ObjectExistence=0,FrameColour=0,WhichFrame=0,Counting=0"):
        with pytest.raises(ValueError, match="mix must"):
            TrainConfig(tasks=tasks, mix=bad)
    _, proc = pocket
    cfg = TrainConfig(tasks=tasks, mix="Counting=6,ObjectExistence=0", batch=40, questions=3, frames=4)
    _, _, recs = make_batch(proc, random.Random(0), cfg, as_words=True)
    first = Counter(t for t, *_ in recs)
    assert first["ObjectExistence"] == 0 and first["Counting"] > 40 * 0.5, first
    text = proc.tokenizer.decode(make_batch(proc, random.Random(1), cfg, as_words=True)[0]["input_ids"].flatten())
    assert text.count("How many frames show") > text.count("In which frame") + text.count("What colour") + text.count("appear in any frame")


def test_aux_counting_follow_ups(pocket):
    """`aux` adds training-only turns with hard options (counts within 2 of the truth, counted right; wrong frames
    sharing the asked frame's colour or shape), the first question still one the eval asks; bad specs are refused."""
    import random
    import re

    from vlmkv.models.pocket.config import TrainConfig, aux_weights
    from vlmkv.models.pocket.train import aux_question, make_batch

    assert aux_weights("") == {} and aux_weights("CountRange=2, CountClose=0.5") == {"CountRange": 2.0, "CountClose": 0.5}
    for bad in ("CountRange", "CountRange=0", "CountRange=inf", "Counting=2", "CountClose=x"):
        with pytest.raises(ValueError, match="aux must"):
            TrainConfig(aux=bad)
    with pytest.raises(ValueError, match="kind must"):
        aux_question("Counting", [("red", "circle")] * 4, random.Random(0))
    rng = random.Random(0)
    for _ in range(300):
        clip = [(rng.choice(["red", "blue"]), rng.choice(["circle", "square", "triangle"])) for _ in range(rng.randrange(2, 40))]
        for kind in ("CountClose", "CountRange"):
            q, choices, ans = aux_question(kind, clip, rng)
            shape = q.rsplit(" ", 1)[1].rstrip("?")
            m = re.match(r"How many of frames (\d+) to (\d+) show", q)
            lo, hi = (int(m[1]) - 1, int(m[2])) if m else (0, len(clip))
            assert (kind == "CountRange") == bool(m) and hi - lo >= 2 and 0 <= lo and hi <= len(clip), q
            assert ans == str(sum(sh == shape for _, sh in clip[lo:hi])) and ans in choices, (q, clip, ans)
            assert all(abs(int(c) - int(ans)) <= 2 and 0 <= int(c) <= hi - lo for c in choices), choices
            assert len(set(choices)) == len(choices) == min(4, 1 + len([v for v in range(int(ans) - 2, int(ans) + 3)
                                                                       if v != int(ans) and 0 <= v <= hi - lo]))
        q, choices, ans = aux_question("WhichClose", clip, rng)
        asked = clip[int(ans.split()[1]) - 1]
        assert q == f"In which frame is the {asked[0]} {asked[1]}?" and ans in choices and len(set(choices)) == len(choices)
        wrong = [clip[int(c.split()[1]) - 1] for c in choices if c != ans]
        shared = [f for f in clip if f != asked and (f[0] == asked[0] or f[1] == asked[1])]
        assert asked not in wrong and len(wrong) == min(3, sum(f != asked for f in clip)), (clip, choices)
        assert sum(f in shared for f in wrong) == min(3, len(shared)), (clip, choices)  # the near ones first
    _, proc = pocket
    tasks = ("ObjectExistence", "FrameColour", "WhichFrame", "Counting")
    cfg = TrainConfig(tasks=tasks, aux="CountRange=3,CountClose=1,WhichClose=1", batch=4, questions=12, frames=8)
    inputs, labels, recs = make_batch(proc, random.Random(3), cfg, as_words=True)
    text = proc.tokenizer.decode(inputs["input_ids"].flatten())
    assert text.count("How many of frames") > 4 and all(t in tasks for t, *_ in recs)
    assert (labels != -100).any(dim=1).all()


@pytest.mark.slow
def test_train_demo_end_to_end_and_resume(tmp_path):
    from safetensors.torch import load_file

    from vlmkv.models.pocket.config import TrainConfig
    from vlmkv.models.pocket.model import build_untrained, load_trained
    from vlmkv.models.pocket.train import train

    from vlmkv.models.cpu_bf16 import bf16_gemm_is_native

    # the default precision: bf16 autocast only where the CPU computes bf16 natively (emulated, it made this test
    # most of the slow set)
    cfg = TrainConfig(out=str(tmp_path), tasks=("FrameColour",), text_steps=1, align_steps=1, joint_steps=1, batch=2,
                      eval_clips=1, frames=4, curriculum="6:1,8:1")
    rec = train(cfg, log=lambda *_: None)
    assert {s["bf16"] for s in rec["stages"].values()} == {bf16_gemm_is_native()}
    assert list(rec["stages"]) == ["text", "align", "joint", "frames6", "frames8"]
    assert all(s["done"] for s in rec["stages"].values())
    state = load_file(tmp_path / "pocket.safetensors")
    assert any(k.startswith("vision_tower.") for k in state) and any(k.endswith("lora_A") for k in state)
    model, _ = build_untrained()
    load_trained(model, state)
    # a second call finds every stage done and only rewrites the weights
    again = train(cfg, log=lambda *_: None)
    assert again["stages"] == json.loads((tmp_path / "train.json").read_text())["stages"] == rec["stages"]
    with pytest.raises(ValueError, match="tasks"):
        TrainConfig(tasks=("Nope",))


@pytest.mark.slow
def test_demo_on_pocket(pocket, tmp_path, capsys):
    from vlmkv.cli import main

    assert main(["demo", "--clips", "1", "--tasks", "FrameColour,Counting", "--methods", "fp16,rtn-2,auto:bits=2.5",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "truth:" in out and "fp16" in out and "rtn-2" in out and "auto:bits=2.5" in out and "KV KiB" in out
    assert (tmp_path / "accuracy_vs_bits.png").exists() and (tmp_path / "answers.json").exists()
