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


def list_tasks(root) -> list[str]:
    root = Path(root)
    return sorted(p.name for p in root.iterdir() if (p / f"{p.name}.json").exists())


def load_task(root, task: str, limit: int | None = None) -> list[Sample]:
    """Samples of one task; images resolved under `<root>/<task>/images/`."""
    d = Path(root) / task
    path = d / f"{task}.json"
    if not path.exists():
        raise ValueError(f"task must have {path}, got task {task!r} under {str(root)!r}")
    raw = json.loads(path.read_text())
    meta = raw.get("meta_data", {})
    instr = meta.get("task_instruction", [""])
    hint = {"answer_hint": meta["answer_hint"]} if "answer_hint" in meta else {}
    out = []
    for item in raw["data"][:limit]:
        inst = item["task_instance"]
        i = item.get("task_instruction_id", 0)
        out.append(Sample(task=task, sample_id=str(item["sample_id"]), instruction=instr[i] if i < len(instr) else "",
                          context=inst.get("context", ""),
                          images=[d / "images" / p for p in inst.get("images_path", [])],
                          choices=inst.get("choice_list"), answer=str(item.get("response", "")), **hint))
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


def score(prediction: str, sample: Sample) -> bool:
    """MileBench-style: for options, the letter (a standalone A-Z at the start or after 'answer') or the option
    text; otherwise the normalized answer contained in the normalized prediction."""
    pred = prediction.strip()
    if sample.choices:
        truth_idx = None
        for i, c in enumerate(sample.choices):
            if _norm(c) == _norm(sample.answer) or sample.answer.strip().upper() == string.ascii_uppercase[i]:
                truth_idx = i
        if truth_idx is None:
            return False
        m = re.match(r"^\(?([A-Z])[\).:\s]", pred + " ") or re.search(r"answer\s*(?:is)?\s*:?\s*\(?([A-Z])\b", pred, re.I)
        if m:
            return string.ascii_uppercase.index(m.group(1).upper()) == truth_idx
        hits = [i for i, c in enumerate(sample.choices) if _norm(c) and _norm(c) in _norm(pred)]
        return hits == [truth_idx]
    return bool(_norm(sample.answer)) and _norm(sample.answer) in _norm(pred)
