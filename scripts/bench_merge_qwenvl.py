"""Build a Qwen2.5-VL with the 7B's widths but few layers (random bf16 weights, sharded like the hub's
checkpoints) and a random LoRA adapter for it, to measure `tuner merge` per layer.

Usage: .venv/bin/python scripts/bench_merge_qwenvl.py WORK [--layers 4]
then:  /usr/bin/time -v .venv/bin/tuner merge --base WORK/base --adapter WORK/adapter --output WORK/merged
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

from tuner.models.qwenvl import add_lora, lora_target_modules, save_adapter
from tuner.models.qwenvl_infer import load_processor_of
from tuner.tiny import build_tiny

# Qwen/Qwen2.5-VL-7B-Instruct's config.json; the layer counts come from --layers.
TEXT_7B = {
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
}
VISION_7B = {"hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 3584}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("work", type=Path)
    parser.add_argument("--layers", type=int, default=4, help="language-model layers and vision blocks")
    args = parser.parse_args()
    tiny = build_tiny("qwen2.5-vl")
    config = AutoConfig.from_pretrained(tiny)
    config.text_config.update({**TEXT_7B, "num_hidden_layers": args.layers, "initializer_range": 0.02})
    config.text_config.layer_types = ["full_attention"] * args.layers
    config.text_config.rope_parameters = {**config.text_config.rope_parameters, "mrope_section": [16, 24, 24]}
    config.vision_config.update(
        {**VISION_7B, "depth": args.layers, "fullatt_block_indexes": [args.layers - 1]}
    )
    config.tie_word_embeddings = False  # the 7B has its own LM head
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: an fp32 copy would double the peak
    model = Qwen2_5_VLForConditionalGeneration(config)
    torch.set_default_dtype(torch.float32)
    model.config.dtype = "bfloat16"
    model.save_pretrained(str(args.work / "base"), max_shard_size="2GB")
    processor = load_processor_of(tiny)
    processor.save_pretrained(str(args.work / "base"))
    peft_model = add_lora(
        model, lora_target_modules(model, "qwen2_5_vl", ("llm", "vision", "merger")), 16, 32
    )
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.01)
    save_adapter(
        peft_model,
        args.work / "adapter",
        processor,
        {"base_model": str(args.work / "base"), "family": "qwen2_5_vl"},
    )
    print(f"base {args.work / 'base'}, adapter {args.work / 'adapter'}")


if __name__ == "__main__":
    main()
