"""Self-contained text prompts with checkable answers (no dataset download).

`copy_table_prompt` asks the model to copy a table of people and cities it was just shown. Copying
reads the whole KV cache, so it is a sensitive probe of cache damage: the full-precision SmolLM2-135M
copies 22-23 of 24 rows, while a cache that blurs keys loses rows at once.
"""
from __future__ import annotations

import random

NAMES = ["Alice", "Bruno", "Chen", "Dalia", "Emeka", "Farah", "Goran", "Hana", "Ivan", "Jia", "Kofi", "Lena",
         "Mateo", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tomas", "Uma", "Victor", "Wanda", "Yusuf"]
CITIES = ["Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Quito", "Tunis", "Riga", "Perth", "Accra", "Bergen", "Cusco"]


def copy_table_prompt(n_rows: int = 24, seed: int = 2) -> tuple[str, list[str]]:
    """Return (user message, expected rows "Name: City")."""
    if not 1 <= n_rows <= len(NAMES):
        raise ValueError(f"n_rows must be in [1, {len(NAMES)}], got {n_rows!r}")
    rng = random.Random(seed)
    rows = [f"{n}: {rng.choice(CITIES)}" for n in NAMES[:n_rows]]
    table = "\n".join(rows)
    return f"Here is a table of people and their cities.\n{table}\n\nCopy the table exactly, one line per person.", rows


def score_copy(answer: str, rows: list[str]) -> float:
    """Fraction of expected rows that appear verbatim in the answer."""
    return sum(r in answer for r in rows) / len(rows)


def chat_inputs(tok, prompts: list[str], chat: bool):
    """Tokenized `prompts` (left-padded), each as one user turn of the tokenizer's chat template when `chat` and
    the tokenizer has one, else as raw text."""
    tok.padding_side = "left"
    if chat and getattr(tok, "chat_template", None):
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
                 for p in prompts]
    else:
        texts = prompts
    return tok(texts, return_tensors="pt", padding=True, add_special_tokens=not chat)
