"""A long, self-contained text prompt with checkable answers (no dataset download)."""
from __future__ import annotations

import random

_NAMES = ["Alice", "Bruno", "Chen", "Dalia", "Emeka", "Farah", "Goran", "Hana", "Ivan", "Jia", "Kofi", "Lena"]
_CITIES = ["Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Quito", "Tunis", "Riga", "Perth", "Accra", "Bergen", "Cusco"]
_ITEMS = ["a red kite", "a blue teapot", "a green lamp", "a yellow drum", "an old map", "a silver key",
          "a wooden flute", "a paper crane", "a brass compass", "a glass bead", "a woollen scarf", "a clay bowl"]


def story_prompt(n_facts: int = 24, seed: int = 0, repeat: int = 1) -> tuple[str, str, str]:
    """Return (context, question, answer): facts about people, one of whom is asked about."""
    rng = random.Random(seed)
    lines = []
    facts = []
    for i in range(n_facts):
        name = _NAMES[i % len(_NAMES)] + ("" if i < len(_NAMES) else f" the {i // len(_NAMES) + 1}th")
        city, item = rng.choice(_CITIES), rng.choice(_ITEMS)
        facts.append((name, city, item))
        lines.append(f"{name} lives in {city} and keeps {item} on the kitchen shelf.")
    context = " ".join(lines * repeat)
    name, city, _ = facts[rng.randrange(len(facts))]
    return context, f"In which city does {name} live? Answer with the city name only.", city
