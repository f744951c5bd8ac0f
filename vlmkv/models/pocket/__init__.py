"""The pocket demo VLM: architecture and loading in `model.py`, LoRA in `lora.py`, training in `train.py`."""
from .model import CHAT_TEMPLATE, TOKENS_PER_FRAME, pocket_path

__all__ = ["CHAT_TEMPLATE", "TOKENS_PER_FRAME", "pocket_path"]
