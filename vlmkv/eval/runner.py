"""`vlmkv eval`: every method on MileBench-format tasks, with accuracy, bytes and fidelity in one table.

Scale-out: run it under `accelerate launch --multi_gpu --num_processes N` (GPUs or machines; on a machine
without CUDA the same command starts N CPU processes joined over gloo; accelerate's `--cpu` flag alone runs
one process unless MPI is set up): samples are split between processes and the results gathered (no
home-made launcher).

Per (method, task): accuracy (MileBench scoring), bits per element and KV MiB from `cache.nbytes()` at the
end of each answer, and next-token KL / top-1 agreement against the `fp16` cache, teacher-forced on the
fp16 answer of the same sample through its end-of-sequence token (`FIDELITY`): a one-token answer gives two
positions, the answer (from the full-precision prefill, equal for every method) and the stop, which reads the
cache. Deterministic (greedy decoding).
"""
from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..cache import cache_kwargs
from ..models.cpu_bf16 import Fp32Linear
from .fidelity import REFERENCE_MIN_NEW_TOKENS, PromptPrefill, greedy_continuation, next_token_kl, top1_agreement
from .milebench import Sample, load_task, score, score_strict


# What KL and top-1 are measured over; run.json records it, so --resume never mixes it with another reference.
# Before 2026-12-02 the reference barred the end-of-sequence token for 2 tokens (min_new_tokens=2): a one-token
# answer ("3", "red", "yes") was forced on past its stop into a made-up next turn, which dominated the KL.
FIDELITY = "fp16 answer through its end-of-sequence token"


@dataclass
class Row:
    method: str
    task: str
    n: int
    accuracy: float
    bits_per_element: float
    kv_mib: float
    kl: float
    top1: float
    accuracy_strict: float = float("nan")  # whole-answer scoring (`score_strict`) beside MileBench's rule


def build_sample_inputs(proc, sample: Sample) -> dict:
    """Chat-formatted inputs with the images where the context's {image#N} placeholders are."""
    if not hasattr(proc, "image_processor"):
        raise ValueError(f"model must come with an image processor for image tasks, got {type(proc).__name__!r}")
    from PIL import Image

    content, images = [], []
    for kind, val in sample.segments():
        if kind == "image":
            content.append({"type": "image"})
            images.append(Image.open(val).convert("RGB"))
        else:
            content.append({"type": "text", "text": val})
    text = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return dict(proc(text=text, images=images or None, return_tensors="pt"))


def _distributed():
    """accelerate's process state when launched with `accelerate launch` on several processes, else None."""
    try:
        from accelerate import PartialState
    except ImportError:
        return None
    # without CUDA, accelerate only forms a process group (gloo) when asked for CPU processes explicitly
    state = PartialState(cpu=not torch.cuda.is_available())
    return state if state.num_processes > 1 else None


def load_records(log_dir) -> dict:
    """(task, sample_id, method) -> record, from every `records*.jsonl` under `log_dir` (all processes')."""
    done = {}
    for f in sorted(Path(log_dir).glob("records*.jsonl")):
        for line in f.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            done[r["task"], r["sample_id"], r["method"]] = r
    return done


def paired(first: dict, second: dict, method: str, second_method: str) -> dict[str, dict]:
    """task -> {clips, first, second, lost, gained} over the clips `first` (`load_records`) answered with `method` and
    `second` with `second_method`: right answers in each, and answers the second lost and gained against the first."""
    out: dict[str, dict] = {}
    for (task, sid, m), r in first.items():
        other = second.get((task, sid, second_method))
        if m != method or other is None:
            continue
        t = out.setdefault(task, {"clips": 0, "first": 0, "second": 0, "lost": 0, "gained": 0})
        t["clips"] += 1
        t["first"] += bool(r["correct"])
        t["second"] += bool(other["correct"])
        t["lost"] += bool(r["correct"]) and not other["correct"]
        t["gained"] += bool(other["correct"]) and not r["correct"]
    return out


def load_samples(data_root, tasks: list[str], limit: int | None = None) -> list[Sample]:
    """Every sample of `tasks`, validated (a clear error naming the file and the sample, before any model runs)."""
    if limit is not None and (not isinstance(limit, int) or limit <= 0):
        raise ValueError(f"limit must be a positive number of samples per task, got {limit!r}")
    if not tasks:
        raise ValueError(f"data must hold at least one task (<root>/<Task>/<Task>.json), got none under {str(data_root)!r}")
    return [s for t in tasks for s in load_task(data_root, t, limit)]


class OutputLock:
    """An exclusive lock on one output folder (per process rank): a second eval writing there is refused."""

    def __init__(self, folder: Path, rank: str):
        import fcntl

        self.f = open(folder / f".lock{rank}", "w")
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.f.close()
            raise ValueError(f"out must not be in use by another vlmkv eval, got {str(folder)!r} (locked): "
                             f"wait for it or pick another --out") from None

    def release(self) -> None:
        self.f.close()


def settings_diff(old: dict, new: dict, keys=None) -> dict:
    """{key: (old value, new value)} for each of `keys` (default: every key of either) where two runs' settings
    (their run.json) differ; a key one of them lacks reads as None."""
    keys = {**old, **new} if keys is None else keys
    return {k: (old.get(k), new.get(k)) for k in keys if old.get(k) != new.get(k)}


def _check_settings(folder: Path, settings: dict, resume: bool) -> None:
    """--resume reuses answers only from a run with the same settings; a fresh run records its settings."""
    path = folder / "run.json"
    if resume and path.exists():
        old = json.loads(path.read_text())
        diff = settings_diff(old, settings)
        if diff:
            raise ValueError(f"resume needs the settings of the run in {folder}, got changes "
                             + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
                             + " (start a fresh --out)")
    path.write_text(json.dumps(settings, indent=1))


def sample_prefill(model, inp: dict, shared: bool, tok) -> PromptPrefill:
    """The prompt of `inp` (`build_sample_inputs`) prefilled once for every method's cache (`shared`), or set up
    for a prefill per cache; its other inputs (pixel_values, ...) go to the prefill."""
    extra = {k: v for k, v in inp.items() if k not in ("input_ids", "attention_mask")}
    return PromptPrefill(model, inp["input_ids"], inp["attention_mask"], shared=shared, tokenizer=tok, **extra)


@torch.no_grad()
def _greedy(model, inp: dict, cache, max_new_tokens: int, tok, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy answer through `cache`: (new token ids [B, N] int64, the logits [B, N, V] float32 each came from)."""
    out = model.generate(**inp, **cache_kwargs(cache), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tok.pad_token_id, output_logits=True, return_dict_in_generate=True, **kw)
    return out.sequences[:, inp["input_ids"].shape[1]:], torch.stack(out.logits, dim=1).float()


def _forced_from_greedy(new: torch.Tensor, logits: torch.Tensor, ref: torch.Tensor) -> torch.Tensor | None:
    """The logits [B, T, V] that teacher-forcing the T tokens of `ref` would give, read off a greedy run whose
    first T-1 tokens are `ref`'s (it saw the same inputs, so they are the same logits); None when it left
    that path or stopped sooner. Saves the teacher-forced prefill for every method that answers like fp16."""
    t = ref.shape[1]
    if new.shape[1] < t or not torch.equal(new[:, :t - 1], ref[:, :t - 1]):
        return None
    return logits[:, :t]


# generation settings whose logits processors `greedy_continuation` does not apply, with their no-op values
_PROCESSORS = {"repetition_penalty": (None, 1.0), "encoder_repetition_penalty": (None, 1.0),
               "no_repeat_ngram_size": (None, 0), "encoder_no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,),
               "suppress_tokens": (None,), "begin_suppress_tokens": (None,), "forced_bos_token_id": (None,),
               "forced_eos_token_id": (None,), "sequence_bias": (None,), "exponential_decay_length_penalty": (None,),
               "min_length": (None, 0), "min_new_tokens": (None, 0), "renormalize_logits": (None, False),
               "remove_invalid_values": (None, False)}


def _shared_prefill_blocker(model) -> str | None:
    """Why greedy decoding from a shared prefill would not equal `generate()` for this model, or None."""
    gc = getattr(model, "generation_config", None)
    for k, ok in _PROCESSORS.items():
        v = getattr(gc, k, None)
        if not any(v is o or v == o for o in ok):
            return f"its generation_config sets {k}={v!r}"
    return None


def _share(samples: list, labels: list[str], done: dict, index: int, count: int) -> list[int]:
    """The sample indices process `index` of `count` runs: those still to answer first, dealt out in turn, so that a
    resumed run splits what is left evenly whichever process answered the rest before (those are only rescored)."""
    left = [i for i, s in enumerate(samples) if any((s.task, s.sample_id, label) not in done for label in labels)]
    answered = sorted(set(range(len(samples))) - set(left))
    return (left + answered)[index::count]


def evaluate(model, proc, data_root, tasks: list[str], methods: list, limit: int | None = None,
             max_new_tokens: int = 8, answers: list | None = None, fidelity: bool = True,
             log_dir=None, resume: bool = False, share_prefill: bool | None = None,
             answer_missing: bool = True) -> list[Row]:
    """methods: names (`"rtn-2"`) or (label, Policy) pairs. `answers`, when given, receives one dict per
    (sample, method) of this process: sample_id, task, question, method, answer, truth, correct, bits.
    `fidelity=False` skips the teacher-forced passes (KL and top-1 are then NaN): about half the time.

    `log_dir`: each (sample, method) result is appended to `log_dir/records.jsonl` as soon as it exists;
    with `resume`, results already there (same task, sample id and method label) are reused, not rerun, so
    a long run that was stopped goes on where it stopped. The records belong to one model and data set:
    start a fresh `log_dir` (or leave `resume` off, which truncates the file) when either changes.

    `share_prefill`: run each prompt through the model once and fill every method's cache from it
    (`QuantizedKVCache.prefill_from`): the same answers, bits and KL as a prefill per method (the prompt attends
    to itself unquantized, so that forward does not depend on the cache), for one forward instead of one per
    method; decoding then runs `greedy_continuation`. None: share unless the model's generation config asks
    for logits processors that loop does not apply (then a prefill per method, through `generate()`); True:
    raise ValueError in that case; False: never share.

    `answer_missing=False` (needs `log_dir` and `resume`): only rescore what `log_dir`'s records hold, run nothing
    new: the rows of a stopped run so far, over the samples that every method answered (a sample some methods
    did not reach is left out for all, so each row compares the same clips).

    Under `accelerate launch` with N processes, the samples are split between processes (each runs every
    method on its share) and the per-sample records are gathered, so every process returns the same rows.
    """
    tok = getattr(proc, "tokenizer", proc)
    if not answer_missing and (log_dir is None or not resume):
        raise ValueError(f"answer_missing=False reports a stopped run from its records: it needs log_dir and "
                         f"resume=True, got log_dir={log_dir!r}, resume={resume!r}")
    if share_prefill not in (None, True, False):
        raise ValueError(f"share_prefill must be None, True or False, got {share_prefill!r}")
    blocker = _shared_prefill_blocker(model) if share_prefill is not False else None
    if share_prefill and blocker:
        raise ValueError(f"share_prefill needs plain greedy decoding, got a model whose {blocker}: "
                         f"pass share_prefill=False (--no-share-prefill)")
    shared = share_prefill is not False and blocker is None
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    samples = load_samples(data_root, tasks, limit)
    state = _distributed()
    records = []
    entries = [(e, e) if isinstance(e, str) else e for e in methods]
    done, log, lock = {}, None, None
    if log_dir is not None:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        rank = "" if state is None else f".rank{state.process_index}"
        lock = OutputLock(Path(log_dir), rank)
        if state is None or state.is_main_process:
            settings = {"model": str(getattr(model.config, "_name_or_path", "")), "data": str(Path(data_root).resolve()),
                        "dtype": str(model.dtype), "max_new_tokens": max_new_tokens,
                        "fidelity": FIDELITY if fidelity else False,
                        "methods": {label: (m if isinstance(m, str) else m.describe()) for label, m in entries}}
            if any(isinstance(mod, Fp32Linear) for mod in model.modules()):  # another summation order: other answers
                settings["linears"] = "float32 (linears_via_fp32)"
            try:
                _check_settings(Path(log_dir), settings, resume)
            except ValueError:
                lock.release()
                raise
        if state is not None:
            state.wait_for_everyone()
        done = load_records(log_dir) if resume else {}
        if state is not None:  # every process has read the same records before any writes a new one
            state.wait_for_everyone()
        path = Path(log_dir) / f"records{rank}.jsonl"
        cut = resume and path.exists() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
        log = open(path, "a" if resume else "w") if answer_missing else None
        if cut and log is not None:  # the last line of a killed run was cut short: start on a line of our own
            log.write("\n")
    order = list(range(len(samples))) if state is None else \
        _share(samples, [label for label, _ in entries], done, state.process_index, state.num_processes)
    for i in tqdm(order, desc="samples", disable=state is not None and not state.is_main_process):
        s = samples[i]
        old = {label: done.get((s.task, s.sample_id, label)) for label, _ in entries}
        if not answer_missing and any(r is None for r in old.values()):
            continue
        for label, r in old.items():
            if r is not None:  # rescored from the stored answer: the scorers may have changed since
                ok, strict = bool(score(r["answer"], s)), bool(score_strict(r["answer"], s))
                records.append((i, label, s.task, ok, r["bits"], r["bytes"], r["kl"], r["top1"], strict))
                if answers is not None:
                    answers.append({k: r[k] for k in ("sample_id", "task", "question", "method", "answer", "truth",
                                                      "correct", "bits")})
        if all(r is not None for r in old.values()):
            continue
        inp = build_sample_inputs(proc, s)
        am = inp["attention_mask"]
        src = sample_prefill(model, inp, shared, tok)

        def greedy(cache, **kw):
            if not src.shared:
                return _greedy(model, inp, cache, max_new_tokens, tok, **kw)
            return greedy_continuation(model, am, cache, src.first, max_new_tokens, eos, tok.pad_token_id, **kw)

        if fidelity:  # the fp16 answer every method is teacher-forced on: at least one token, then its stop
            with src.cache("fp16") as cache:
                ref, lr = greedy(cache, min_new_tokens=REFERENCE_MIN_NEW_TOKENS)
        for label, m in entries:
            if old[label] is not None:
                continue
            with src.cache(m) as cache:
                new, lg = greedy(cache)
                ans = tok.decode(new[0], skip_special_tokens=True)
                bpe, nb = cache.bits_per_element(), cache.nbytes()
            kl = top1 = float("nan")
            positions = 0
            if fidelity:
                positions = ref.shape[1]
                lq = _forced_from_greedy(new, lg, ref)
                if lq is None:  # the answer left fp16's path: teacher-force it
                    with src.cache(m) as c1:
                        lq = src.forced(c1, ref)
                kl = float(next_token_kl(lr, lq).mean())
                top1 = float(top1_agreement(lr, lq).mean())
            ok, strict = bool(score(ans, s)), bool(score_strict(ans, s))
            records.append((i, label, s.task, ok, bpe, nb, kl, top1, strict))
            rec = {"sample_id": s.sample_id, "task": s.task, "question": s.context.rsplit("\n", 1)[-1],
                   "method": label, "answer": ans.strip(), "truth": s.answer, "correct": ok, "strict": strict,
                   "bits": bpe}
            if answers is not None:
                answers.append(rec)
            if log is not None:
                log.write(json.dumps({**rec, "bytes": nb, "kl": kl, "top1": top1, "kl_positions": positions}) + "\n")
                log.flush()
    if log is not None:
        log.close()
    if lock is not None:
        lock.release()
    if state is not None:
        from accelerate.utils import gather_object

        records = sorted(gather_object(records))
    rows = []
    for label, _ in entries:
        for t in dict.fromkeys(s.task for s in samples):
            vals = [r for r in records if r[1] == label and r[2] == t]
            if not vals:
                continue
            n = len(vals)
            rows.append(Row(label, t, n, sum(v[3] for v in vals) / n, sum(v[4] for v in vals) / n,
                            sum(v[5] for v in vals) / n / 2**20, sum(v[6] for v in vals) / n, sum(v[7] for v in vals) / n,
                            sum(v[8] for v in vals) / n))
    return rows


def write_outputs(rows: list[Row], out_dir) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        w.writeheader()
        for r in rows:
            w.writerow(asdict(r))
    (out / "results.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
    paths = [out / "results.csv", out / "results.json"]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for m in dict.fromkeys(r.method for r in rows):
            rs = [r for r in rows if r.method == m]
            acc = sum(r.accuracy * r.n for r in rs) / sum(r.n for r in rs)
            bits = sum(r.bits_per_element * r.n for r in rs) / sum(r.n for r in rs)
            ax.scatter([bits], [acc], label=m)
        ax.set_xlabel("bits per element (from bytes)")
        ax.set_ylabel("accuracy")
        ax.set_title("Accuracy vs KV bits")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "accuracy_vs_bits.png", dpi=90)
        plt.close(fig)
        paths.append(out / "accuracy_vs_bits.png")
    except ImportError:
        pass
    return paths


def table(rows: list[Row]) -> str:
    """Markdown table; a `strict` column (whole-answer scoring) appears where it differs from MileBench's rule."""
    strict = any(r.accuracy_strict == r.accuracy_strict and r.accuracy_strict != r.accuracy for r in rows)
    head = "| method | task | n | accuracy |" + (" strict |" if strict else "") + " bits/element | KV MiB | KL vs fp16 | top-1 vs fp16 |"
    lines = [head, "|---|---|---:|---:|" + ("---:|" if strict else "") + "---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.method} | {r.task} | {r.n} | {r.accuracy:.2f} |" + (f" {r.accuracy_strict:.2f} |" if strict else "")
                     + f" {r.bits_per_element:.2f} | {r.kv_mib:.2f} | {r.kl:.4f} | {r.top1:.3f} |")
    return "\n".join(lines)


def baselines(data_root, tasks: list[str], limit: int | None = None) -> str:
    """Markdown: per task, the accuracy of guessing (mean 1 / options) and of always giving the most frequent
    true answer of that very set (majority with hindsight), the bars a model must clear."""
    from collections import Counter

    lines = ["| task | n | chance | majority |", "|---|---:|---:|---:|"]
    for t in tasks:
        ss = load_task(data_root, t, limit)
        if not ss:
            continue
        chance = sum(1 / len(s.choices) if s.choices else 0.0 for s in ss) / len(ss)
        major = Counter(s.answer for s in ss).most_common(1)[0][1] / len(ss)
        lines.append(f"| {t} | {len(ss)} | {chance:.2f} | {major:.2f} |")
    return "\n".join(lines)
