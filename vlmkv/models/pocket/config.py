"""Training options of the pocket demo VLM, apart from train.py so that the CLI builds its flags cheaply."""
from __future__ import annotations

from dataclasses import dataclass

from ...eval.synthetic import TASKS, check_tasks

# training-only follow-up questions with hard options (see train.aux_question): counting with every option within 2
# of the truth ("CountClose", the eval's wording; "CountRange", over a stretch of the clip) and WhichFrame whose
# wrong options share the colour or the shape of the asked frame ("WhichClose")
AUX_TASKS = ("CountClose", "CountRange", "WhichClose")


@dataclass
class TrainConfig:
    out: str = "out/pocket-train"
    tasks: tuple[str, ...] = TASKS
    frames: int = 8
    batch: int = 8
    questions: int = 4  # question turns per training clip (the first as `vlmkv eval` asks it)
    text_steps: int = 400
    align_steps: int = 400
    joint_steps: int = 300
    lr: float = 5e-4
    vision_lr: float = 1e-3
    lora_r: int = 16
    eval_clips: int = 32
    seed: int = 0
    init: str = ""  # start from this pocket.safetensors (e.g. an earlier run's) instead of fresh adapters; its adapters
    # may have a smaller rank than lora_r (they fill the first ranks, the model starts unchanged: lora.load_lora)
    # bf16 autocast for the backbone's forward and backward; None picks it where the CPU computes bf16 natively
    # and float32 elsewhere (emulated bf16 GEMMs made a 64-frame step 420 s against 25 s in float32 on an AVX2 CPU)
    bf16: bool | None = None
    # long-clip curriculum after the three stages: "FRAMES:STEPS,..." in rising order, e.g. "16:60,32:80,64:120";
    # each level is a LoRA stage on clips of up to FRAMES frames (see train.py)
    curriculum: str = ""
    # how often each task is drawn, for first questions and follow-ups alike: "TASK=WEIGHT,...", unnamed tasks
    # weigh 1 (e.g. "Counting=3,WhichFrame=3" for the long-range tasks); "" draws them uniformly
    mix: str = ""
    # training-only follow-ups drawn among the other follow-ups with these weights (on `mix`'s scale, where an
    # unnamed task weighs 1): "AUX=WEIGHT,..." over AUX_TASKS, e.g. "CountClose=2,CountRange=2"; "" adds none
    aux: str = ""

    def __post_init__(self):
        for k in ("frames", "batch", "questions", "lora_r", "eval_clips"):
            if not isinstance(getattr(self, k), int) or getattr(self, k) <= 0:
                raise ValueError(f"{k} must be a positive integer, got {getattr(self, k)!r}")
        for k in ("text_steps", "align_steps", "joint_steps"):
            if not isinstance(getattr(self, k), int) or getattr(self, k) < 0:
                raise ValueError(f"{k} must be a non-negative integer, got {getattr(self, k)!r}")
        if self.bf16 not in (None, True, False):
            raise ValueError(f"bf16 must be True, False or None (auto), got {self.bf16!r}")
        check_tasks(self.tasks)
        curriculum_levels(self.curriculum, self.frames)
        task_weights(self.mix, self.tasks)
        aux_weights(self.aux)


def curriculum_levels(spec: str, base: int = 8) -> list[tuple[int, int]]:
    """[(frames, steps), ...] from "FRAMES:STEPS,...": frame counts rising from above `base`, steps > 0."""
    levels = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        try:
            f, n = (int(v) for v in item.split(":"))
        except ValueError:
            raise ValueError(f"curriculum must be FRAMES:STEPS,... (e.g. '16:60,32:80'), got {spec!r}") from None
        if n <= 0 or f <= (levels[-1][0] if levels else base):
            raise ValueError(f"curriculum frame counts must rise above frames={base} and steps be positive, got {spec!r}")
        levels.append((f, n))
    return levels


def _named_weights(spec: str, names) -> dict[str, float] | None:
    """{name: weight} from "NAME=WEIGHT,..." with names from `names` and finite weights >= 0; None when an item is
    not of that form (the callers raise, each naming its own option)."""
    out = {}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        name, _, w = item.partition("=")
        try:
            weight = float(w)
        except ValueError:
            return None
        if name.strip() not in names or not 0 <= weight < float("inf"):
            return None
        out[name.strip()] = weight
    return out


def aux_weights(spec: str) -> dict[str, float]:
    """{aux task: weight} from "AUX=WEIGHT,..." over AUX_TASKS (weights finite and > 0); {} for ""."""
    out = _named_weights(spec, AUX_TASKS)
    if out is None or 0.0 in out.values():
        raise ValueError(f"aux must be AUX=WEIGHT,... over {AUX_TASKS} with finite weights > 0, got {spec!r}")
    return out


def task_weights(mix: str, tasks) -> list[float] | None:
    """Weights aligned with `tasks` from "TASK=WEIGHT,..." (unnamed tasks weigh 1); None for "" (uniform draws)."""
    if not mix.strip():
        return None
    named = _named_weights(mix, tasks)
    if named is None:
        raise ValueError(f"mix must be TASK=WEIGHT,... over the trained tasks {tuple(tasks)} with finite "
                         f"weights >= 0, got {mix!r}")
    weights = [named.get(t, 1.0) for t in tasks]
    if not any(weights):
        raise ValueError(f"mix must leave some task a positive weight, got {mix!r}")
    return weights
