"""An SDXL diffusers folder in the layout the published ones have (stabilityai/stable-diffusion-xl-base-1.0).

transformers 5 (checked with 5.23 and 5.25) saves `CLIPTextModel` without its `text_model.` level
(`encoder.layers.0...`), while `CLIPTextModelWithProjection` keeps it. ComfyUI reads a text encoder file
by those names: `comfy/sd.py` `detect_te_model` recognises CLIP-L by
`text_model.encoder.layers.0.mlp.fc1.weight`, and `comfy/sdxl_clip.py` `SDXLClipModel.load_sd` hands a
file without `text_model.encoder.layers.30.mlp.fc1.weight` to CLIP-L, whose `load_state_dict(strict=False)`
then matches no key: CLIP-L stays random with only a "clip missing" warning. So the folder's CLIP-L file
gets the `text_model.` level back; transformers 5 and diffusers load both layouts.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

CLIP_LEVEL = "text_model."
_INDEX_SUFFIX = ".safetensors.index.json"


def save_sdxl_folder(pipeline, folder: Path) -> Path:
    """`pipeline.save_pretrained(folder)` (safetensors), then the text encoders in the published layout."""
    folder = Path(folder)
    pipeline.save_pretrained(folder, safe_serialization=True)
    for name in ("text_encoder", "text_encoder_2"):
        if (folder / name).is_dir():
            add_clip_level(folder / name)
    return folder


def add_clip_level(encoder_folder: Path) -> None:
    """Put `text_model.` in front of every CLIP text-model weight name saved without it (the projection
    of CLIP-bigG, `text_projection.weight`, sits beside `text_model`, as in the published files)."""
    for file in sorted(encoder_folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata()
            keys = list(handle.keys())
            if all(_has_level(key) for key in keys):
                continue
            tensors = {_with_level(key): handle.get_tensor(key) for key in keys}
        save_file(tensors, str(file), metadata=metadata)
    for index_file in encoder_folder.glob(f"*{_INDEX_SUFFIX}"):
        index = json.loads(index_file.read_text(encoding="utf-8"))
        index["weight_map"] = {_with_level(key): shard for key, shard in index["weight_map"].items()}
        index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _has_level(key: str) -> bool:
    return key.startswith(CLIP_LEVEL) or key.startswith("text_projection")


def _with_level(key: str) -> str:
    return key if _has_level(key) else CLIP_LEVEL + key
