"""The checks vLLM 0.32 makes before loading anything, shared by the stand-in's `LLM` and its server."""

from __future__ import annotations

import json
import re
from pathlib import Path

# vllm/config/model.py `ModelDType`.
DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")
# vllm/config/lora.py `MaxLoRARanks`.
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def check_model(model: str) -> None:
    """A local folder must hold a transformers model (a hub ID would be downloaded: none is used here)."""
    if not (Path(model) / "config.json").is_file():
        raise ValueError(f"stand-in: {model} holds no config.json (a hub ID cannot be served offline)")


def check_lora_folder(path: str) -> None:
    """vllm/lora/peft_helper.py reads `adapter_config.json` from the LoRA folder."""
    if not (Path(path) / "adapter_config.json").is_file():
        raise ValueError(f"stand-in: LoRA folder {path} holds no adapter_config.json")


def check_media_folder(allowed_local_media_path: str) -> Path | None:
    """vllm/multimodal/media/connector.py `MediaConnector.__init__`."""
    if not allowed_local_media_path:
        return None
    folder = Path(allowed_local_media_path).resolve()
    if not folder.exists():
        raise ValueError(f"Invalid `--allowed-local-media-path`: The path {folder} does not exist.")
    if not folder.is_dir():
        raise ValueError(f"Invalid `--allowed-local-media-path`: The path {folder} must be a directory.")
    return folder


def load_file_url(url: str, allowed: Path | None) -> Path:
    """vllm/multimodal/media/connector.py `MediaConnector._load_file_url`."""
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    from PIL import Image

    if allowed is None:
        raise RuntimeError("Cannot load local files without `--allowed-local-media-path`.")
    spec = urlparse(url)
    path = Path(url2pathname(spec.netloc + spec.path))
    if allowed not in path.resolve().parents:
        raise ValueError(f"The file path {path} must be a subpath of `--allowed-local-media-path {allowed}`.")
    Image.open(path).load()
    return path


def human_readable_int(value: str) -> int:
    """vllm/utils/argparse_utils.py `human_readable_int`: 1k = 1000, 1K = 1024."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmMgGtT])", value.strip())
    if not match:
        return int(value)
    number, suffix = match.groups()
    if suffix.islower():
        return int(float(number) * 10 ** (3 * "kmgt".index(suffix) + 3))
    return int(number) * 2 ** (10 * "KMGT".index(suffix) + 10)


def report(settings: dict) -> str:
    return json.dumps(settings, sort_keys=True)
