"""MileBench's on-disk format, read and written, and its scoring.

Layout (as MileBench ships it): `<root>/<Task>/<Task>.json` with

    {"meta_data": {"task_instruction": ["...", ...], ...},
     "data": [{"sample_id": ..., "task_instruction_id": 0,
               "task_instance": {"context": "... {image#1} ... {image#2} ...", "images_path": ["a.png", ...],
                                 "choice_list": ["...", ...]},          # optional: multiple choice
               "response": "..."}, ...]}

and the images under `<root>/<Task>/images/`. Multiple-choice answers are scored as MileBench does: the
option letter (A, B, ...) or the option text found in the answer; open answers by normalized containment.
"""
from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass, field
from pathlib import Path

PLACEHOLDER = re.compile(r"\{image#(\d+)\}")


@dataclass
class Sample:
    task: str
    sample_id: str
    instruction: str
    context: str
    images: list[Path] = field(default_factory=list)
    choices: list[str] | None = None
    answer: str = ""
    answer_hint: str = "Answer with the option's letter."

    def segments(self) -> list[tuple[str, object]]:
        """The prompt as an ordered list of ("text", str) and ("image", Path) pieces: instruction, context with
        its {image#N} placeholders, then the options."""
        out: list[tuple[str, object]] = [("text", self.instruction + "\n")] if self.instruction else []
        pos = 0
        for m in PLACEHOLDER.finditer(self.context):
            if m.start() > pos:
                out.append(("text", self.context[pos:m.start()]))
            k = int(m.group(1)) - 1
            if not 0 <= k < len(self.images):
                raise ValueError(f"context must reference existing images, got {m.group(0)!r} with {len(self.images)} images")
            out.append(("image", self.images[k]))
            pos = m.end()
        if pos < len(self.context):
            out.append(("text", self.context[pos:]))
        if self.choices:
            opts = "\n".join(f"{string.ascii_uppercase[i]}. {c}" for i, c in enumerate(self.choices))
            out.append(("text", f"\nOptions:\n{opts}\n{self.answer_hint}"))
        return out


class DatasetError(ValueError):
    """A data file that cannot be read as MileBench's format: the message names the file and the sample."""


def list_tasks(root) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"data must be a folder of MileBench tasks (<root>/<Task>/<Task>.json), got {str(root)!r}")
    return sorted(p.name for p in root.iterdir() if (p / f"{p.name}.json").exists())


def _image_path(images: Path, name, where: str) -> Path:
    """`images / name`, refused unless it stays inside `images` (no absolute paths, no `..`, no links out)."""
    if not isinstance(name, str) or not name or Path(name).is_absolute():
        raise DatasetError(f"{where}: images_path entries must be relative file names under {images}, got {name!r}")
    p = (images / name).resolve()
    if not p.is_relative_to(images.resolve()):
        raise DatasetError(f"{where}: images_path must stay inside {images}, got {name!r}")
    if not p.is_file():
        raise DatasetError(f"{where}: image {name!r} not found under {images}")
    return p


def load_task(root, task: str, limit: int | None = None) -> list[Sample]:
    """Samples of one task; images resolved under (and confined to) `<root>/<task>/images/`.

    Raises DatasetError naming the file and the sample for anything malformed: unreadable JSON, missing keys,
    image paths outside the folder or missing, placeholders and images that do not match one to one, no samples.
    """
    d = Path(root) / task
    path = d / f"{task}.json"
    if not path.exists():
        raise DatasetError(f"task must have {path}, got task {task!r} under {str(root)!r}")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("data"), list):
        raise DatasetError(f"{path}: must hold {{'meta_data': ..., 'data': [samples]}}, got keys "
                           f"{sorted(raw) if isinstance(raw, dict) else type(raw).__name__!r}")
    meta = raw.get("meta_data") or {}
    instr = meta.get("task_instruction", [""]) if isinstance(meta, dict) else [""]
    hint = {"answer_hint": meta["answer_hint"]} if isinstance(meta, dict) and "answer_hint" in meta else {}
    seen: dict[str, int] = {}
    for k, item in enumerate(raw["data"]):  # records are keyed by sample id (--resume): one id, one sample
        if isinstance(item, dict) and "sample_id" in item:
            sid = str(item["sample_id"])
            if sid in seen:
                raise DatasetError(f"{path}: samples {seen[sid]} and {k} share sample_id {sid!r}; each sample needs "
                                   f"its own id")
            seen[sid] = k
    out = []
    for k, item in enumerate(raw["data"][:limit]):
        where = f"{path}, sample {k}" + (f" ({item.get('sample_id')!r})" if isinstance(item, dict) else "")
        if not isinstance(item, dict):
            raise DatasetError(f"{where}: must be an object, got {type(item).__name__}")
        missing = [key for key in ("sample_id", "task_instance", "response") if key not in item]
        if missing or not isinstance(item.get("task_instance"), dict):
            raise DatasetError(f"{where}: missing {missing or ['task_instance (an object)']}")
        inst = item["task_instance"]
        names = inst.get("images_path", [])
        if not isinstance(names, list):
            raise DatasetError(f"{where}: images_path must be a list, got {type(names).__name__}")
        images = [_image_path(d / "images", n, where) for n in names]
        context = inst.get("context", "")
        refs = {int(m.group(1)) for m in PLACEHOLDER.finditer(context)}
        if refs != set(range(1, len(images) + 1)):
            raise DatasetError(f"{where}: the context's {{image#N}} placeholders {sorted(refs)} must name each of its "
                               f"{len(images)} images once")
        choices = inst.get("choice_list")
        if choices is not None and (not isinstance(choices, list) or not all(isinstance(c, str) for c in choices)):
            raise DatasetError(f"{where}: choice_list must be a list of strings, got {choices!r}")
        i = item.get("task_instruction_id", 0)
        out.append(Sample(task=task, sample_id=str(item["sample_id"]),
                          instruction=instr[i] if isinstance(i, int) and 0 <= i < len(instr) else "",
                          context=context, images=images, choices=choices, answer=str(item["response"]), **hint))
    if not out:
        raise DatasetError(f"{path}: no samples")
    return out


def write_task(root, task: str, instructions: list[str], samples: list[dict], answer_hint: str | None = None) -> Path:
    """Write `<root>/<task>/<task>.json`; each sample dict has sample_id, context, images_path, response and
    optionally choice_list and task_instruction_id (images must already be under `<root>/<task>/images/`).
    `answer_hint` (an extension, kept in meta_data) replaces the line asking for the option's letter."""
    d = Path(root) / task
    d.mkdir(parents=True, exist_ok=True)
    data = [{"sample_id": s["sample_id"], "task_instruction_id": s.get("task_instruction_id", 0),
             "task_instance": {k: s[k] for k in ("context", "images_path", "choice_list") if k in s},
             "response": s["response"]} for s in samples]
    path = d / f"{task}.json"
    meta = {"task_instruction": instructions, "source": "vlmkv synthetic"}
    if answer_hint is not None:
        meta["answer_hint"] = answer_hint
    path.write_text(json.dumps({"meta_data": meta, "data": data}, indent=1))
    return path


def _norm(s: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", s.lower())).strip()


def _contains(needle: str, hay: str) -> bool:
    """Whether normalized `needle` occurs in normalized `hay` as whole words ("frame 1" is not in "frame 12")."""
    n, h = _norm(needle), _norm(hay)
    return bool(n) and re.search(rf"(?<!\w){re.escape(n)}(?!\w)", h) is not None


def _truth_index(sample: Sample) -> int | None:
    for i, c in enumerate(sample.choices):
        if _norm(c) == _norm(sample.answer) or sample.answer.strip().upper() == string.ascii_uppercase[i]:
            return i
    return None


def score(prediction: str, sample: Sample) -> bool:
    """MileBench's rule: for options, the option letter (a standalone letter among the options' letters, at the
    start or after 'answer') or else the one option whose text the answer contains; open answers by the
    normalized truth contained in the answer, as whole words."""
    pred = prediction.strip()
    if sample.choices:
        truth = _truth_index(sample)
        if truth is None:
            return False
        letters = string.ascii_uppercase[:len(sample.choices)]
        m = re.match(rf"^\(?([{letters}])[\).:\s]", pred + " ") or \
            re.search(rf"answer\s*(?:is)?\s*:?\s*\(?([{letters}])\b", pred, re.I)
        if m and m.group(1).upper() in letters:
            return letters.index(m.group(1).upper()) == truth
        hits = [i for i, c in enumerate(sample.choices) if _contains(c, pred)]
        return hits == [truth]
    return _contains(sample.answer, pred)


def score_strict(prediction: str, sample: Sample) -> bool:
    """Whole answers only: exactly the option's letter (optionally with ')' or '.' and its text), exactly the
    option's text, or exactly the open answer, after normalization."""
    pred = _norm(prediction)
    if sample.choices:
        truth = _truth_index(sample)
        if truth is None:
            return False
        letter, text = string.ascii_uppercase[truth].lower(), _norm(sample.choices[truth])
        return pred in (letter, text, f"{letter} {text}")
    return bool(pred) and pred == _norm(sample.answer)
