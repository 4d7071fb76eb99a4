"""Stand-in for vLLM 0.32's `LLM` and `SamplingParams` (see ../README.md)."""

from __future__ import annotations

import multiprocessing
from dataclasses import dataclass, field
from typing import Any

from vllm import _checks


def _engine_process() -> None:
    """The engine core's process: nothing to do here but to have been started."""


class LLM:
    # vllm/entrypoints/llm.py `LLM.__init__` (0.32): `model`, then keyword-only engine arguments; an
    # unknown keyword fails in `EngineArgs(**kwargs)` with a TypeError, as it does here.
    def __init__(
        self,
        model: str,
        *,
        dtype: str = "auto",
        allowed_local_media_path: str = "",
        enable_lora: bool = False,
        max_lora_rank: int = 16,
        enable_tower_connector_lora: bool = False,
        mm_processor_kwargs: dict[str, Any] | None = None,
        kv_cache_memory_bytes: int | None = None,
        gpu_memory_utilization: float = 0.92,
        max_model_len: int | None = None,
    ) -> None:
        if dtype not in _checks.DTYPES:
            raise ValueError(f"stand-in: dtype {dtype!r} is not one of {_checks.DTYPES}")
        if max_lora_rank not in _checks.MAX_LORA_RANKS:
            raise ValueError(f"stand-in: max_lora_rank {max_lora_rank} not in {_checks.MAX_LORA_RANKS}")
        _checks.check_model(model)
        self._media = _checks.check_media_folder(allowed_local_media_path)
        # vLLM's engine core runs in a process started with the spawn method, which imports the caller's
        # main module again: a script without an `if __name__ == "__main__":` guard starts a second LLM
        # there, which multiprocessing refuses ("An attempt has been made to start a new process before
        # the current process has finished its bootstrapping phase").
        engine = multiprocessing.get_context("spawn").Process(target=_engine_process)
        engine.start()
        engine.join()
        if engine.exitcode != 0:
            raise RuntimeError("Engine core initialization failed. See root cause above.")
        self.settings = {
            "model": model,
            "dtype": dtype,
            "enable_lora": enable_lora,
            "max_lora_rank": max_lora_rank,
            "enable_tower_connector_lora": enable_tower_connector_lora,
            "mm_processor_kwargs": mm_processor_kwargs,
        }

    def chat(self, messages, sampling_params=None, use_tqdm=True, lora_request=None, **options) -> list:
        images = []
        for message in messages:
            for part in message["content"] if isinstance(message["content"], list) else []:
                if part.get("type") == "image_url":
                    url = part["image_url"]["url"]
                    if url.startswith("file:"):
                        images.append(str(_checks.load_file_url(url, self._media)))
        if lora_request is not None:
            if not self.settings["enable_lora"]:
                raise ValueError("LoRA is not enabled! Please set enable_lora=True")
            _checks.check_lora_folder(lora_request.lora_path)
        answer = {
            **self.settings,
            "images": images,
            "lora_path": lora_request.lora_path if lora_request else None,
            "temperature": getattr(sampling_params, "temperature", None),
        }
        return [_RequestOutput([_CompletionOutput(_checks.report(answer))])]


@dataclass
class SamplingParams:
    # vllm/sampling_params.py (0.32): a few of its fields; an unknown one is a TypeError there too.
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    max_tokens: int | None = 16


@dataclass
class _CompletionOutput:
    text: str


@dataclass
class _RequestOutput:
    outputs: list[_CompletionOutput]
