"""Synthetic multi-frame clips in MileBench's format (temporal tasks in the spirit of MileBench's OE/ST/SC).

Each clip has `frames` 64x64 frames with one coloured shape each; the context lists "Frame k: {image#k}"
then the question; answers are multiple choice. Deterministic for a seed.
"""
from __future__ import annotations

import random
from pathlib import Path

from .milebench import write_task

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")
TASKS = ("ObjectExistence", "FrameColour", "WhichFrame", "Counting", "StateChange")


INSTRUCTION = "Watch the frames of the clip and answer the question."
ANSWER_HINT = "Answer with the option's text."  # the pocket VLM answers "red", not "A" (see models/pocket)


def draw(colour: str, shape: str, size: int = 64):
    """One frame: a `colour` `shape` centred on a light background, as a PIL RGB image of `size` x `size`."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (245, 245, 245))
    d = ImageDraw.Draw(img)
    c, m = COLOURS[colour], size // 5
    box = (m, m, size - m, size - m)
    if shape == "circle":
        d.ellipse(box, fill=c)
    elif shape == "square":
        d.rectangle(box, fill=c)
    else:
        d.polygon([(size // 2, m), (size - m, size - m), (m, size - m)], fill=c)
    return img


def make_question(task: str, clip: list[tuple[str, str]], rng: random.Random) -> tuple[str, list[str], str]:
    n = len(clip)
    if task == "ObjectExistence":
        present = rng.random() < 0.5
        pool = [(c, s) for c in COLOURS for s in SHAPES if ((c, s) in clip) == present]
        if not pool:  # a long clip shows every combination: take one out (edits the clip in place)
            gone = rng.choice(sorted(set(clip)))
            others = [(c, s) for c in COLOURS for s in SHAPES if (c, s) != gone]
            clip[:] = [rng.choice(others) if f == gone else f for f in clip]
            pool = [gone]
        c, s = rng.choice(pool)
        return f"Does a {c} {s} appear in any frame?", ["yes", "no"], "yes" if present else "no"
    if task == "FrameColour":
        k = rng.randrange(n)
        return f"What colour is the shape in frame {k + 1}?", list(COLOURS), clip[k][0]
    if task == "WhichFrame":
        k = rng.randrange(n)
        pool = [f"frame {i + 1}" for i in range(n) if clip[i] != clip[k]]
        others = rng.sample(pool, min(3, len(pool)))  # fewer options only when most frames repeat frame k
        opts = others + [f"frame {k + 1}"]
        rng.shuffle(opts)
        return f"In which frame is the {clip[k][0]} {clip[k][1]}?", opts, f"frame {k + 1}"
    if task == "Counting":
        s = rng.choice(SHAPES)
        cnt = sum(1 for _, sh in clip if sh == s)
        opts = sorted({cnt, *rng.sample(range(0, n + 1), 3)})[:4]
        if cnt not in opts:
            opts[-1] = cnt
        return f"How many frames show a {s}?", [str(o) for o in sorted(opts)], str(cnt)
    if task == "StateChange":
        changed = clip[0][0] != clip[-1][0]
        return "Is the shape's colour in the last frame different from the first frame?", ["yes", "no"], \
            "yes" if changed else "no"
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def check_tasks(tasks) -> None:
    """Raise ValueError unless `tasks` is a non-empty collection of names from TASKS."""
    if not tasks or any(t not in TASKS for t in tasks):
        raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {tasks!r}")


def sample_clip(rng: random.Random, task: str, frames: int = 8) -> tuple[list[tuple[str, str]], str, list[str], str]:
    """One clip of `frames` (colour, shape) frames and its question: (clip, question, choices, answer)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    clip = [(rng.choice(list(COLOURS)), rng.choice(SHAPES)) for _ in range(frames)]
    if task == "StateChange":  # balanced: the last frame keeps the first frame's colour half the time
        first = clip[0][0]
        last = first if rng.random() < 0.5 else rng.choice([c for c in COLOURS if c != first])
        clip[-1] = (last, clip[-1][1])
    q, choices, ans = make_question(task, clip, rng)
    return clip, q, choices, ans


def context(frames: int, question: str) -> str:
    """MileBench-style context: one "Frame k: {image#k}" line per frame, then the question."""
    return "\n".join(f"Frame {k + 1}: {{image#{k + 1}}}" for k in range(frames)) + f"\nQuestion: {question}"


def make_dataset(root, tasks=TASKS, samples: int = 20, frames: int = 8, seed: int = 0) -> list[str]:
    """Write `samples` clips per task under `root` in MileBench's format; returns the task names."""
    if frames < 4:
        raise ValueError(f"frames must be at least 4, got {frames!r}")
    for task in tasks:
        rng = random.Random(f"{seed}-{task}")
        img_dir = Path(root) / task / "images"
        img_dir.mkdir(parents=True, exist_ok=True)
        rows = []
        for i in range(samples):
            clip, q, choices, ans = sample_clip(rng, task, frames)
            names = []
            for k, (c, s) in enumerate(clip):
                name = f"{i:04d}_{k}.png"
                draw(c, s).save(img_dir / name)
                names.append(name)
            rows.append({"sample_id": f"{task}_{i}", "context": context(frames, q), "images_path": names, "choice_list": choices,
                         "response": ans})
        write_task(root, task, [INSTRUCTION], rows, answer_hint=ANSWER_HINT)
    return list(tasks)
