"""Stand-in for vllm/lora/request.py `LoRARequest` (0.32: lora_name, lora_int_id, lora_path, ...)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    base_model_name: str | None = None
    load_inplace: bool = False
