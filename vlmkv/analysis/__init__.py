"""Attention-pattern analysis (text-salient / pivot-token-salient layers) and plots."""
from .attention_patterns import AttentionReport, inspect_attention

__all__ = ["AttentionReport", "inspect_attention"]
