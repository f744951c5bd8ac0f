"""Evaluation helpers: fidelity against the full-precision cache, sample prompts."""
