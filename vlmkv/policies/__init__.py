"""Registered KV-cache policies. Importing this package registers every built-in policy."""
from .base import (BitPlan, DecodeRule, Policy, PrefillContext, get_policy, list_policies, register_policy,
                   PAD, TEXT, IMAGE, SPECIAL)
from . import fp16, rtn, kivi, akvq_vl, windowquant, smoothquant, skvq, auto, compose  # noqa: F401  (registration)

__all__ = ["BitPlan", "DecodeRule", "Policy", "PrefillContext", "get_policy", "list_policies",
           "register_policy", "PAD", "TEXT", "IMAGE", "SPECIAL"]
