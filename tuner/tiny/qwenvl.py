"""Tiny random Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3-VL-MoE models, saved as ordinary folders.

Each folder holds the model (safetensors), a generation config and a processor (byte-level BPE tokenizer
with the real Qwen special tokens, image processor, video processor, the family's chat template), all
written with `save_pretrained` so `AutoProcessor.from_pretrained` and the family's `from_pretrained` load it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from transformers import (
    GenerationConfig,
    PreTrainedModel,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Tokenizer,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from tuner.tiny.bpe import gpt2_style_bpe
from tuner.tiny.qwen3_vl_thinking import QWEN3_VL_THINKING_CHAT_TEMPLATE

# Bump when a saved model changes, so cached folders from an older builder are rebuilt.
BUILDER_VERSION = 1
SEED = 0

TEXT_HIDDEN = 64
TEXT_HEADS = 4
TEXT_KV_HEADS = 2
TEXT_HEAD_DIM = TEXT_HIDDEN // TEXT_HEADS
# A frozen random lm_head initialised at the usual 0.02 caps the logit margin a LoRA can reach at this
# width (the loss plateaus near 4.8 nats); 0.3 lets a LoRA overfit tiny data in under 100 steps.
TEXT_INITIALIZER_RANGE = 0.3

# The real Qwen2-VL special tokens, in their real order (ids 151643.. in the real vocabulary).
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen2-VL's chat template (Qwen2.5-VL uses the same): a default system prompt, then ChatML turns with
# images and videos as <|vision_start|><|image_pad|><|vision_end|> placeholders the processor expands.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen3-VL's chat template differs from Qwen2-VL's: no default system prompt, tool calls and tool
# responses in the Hermes style, and consecutive tool results grouped into one user turn.
QWEN3_VL_CHAT_TEMPLATE = (
    # Literal text sits in {{ '...' }} expressions so the {%- -%} whitespace control never eats its newlines.
    "{%- set image_count = namespace(value=0) -%}{%- set video_count = namespace(value=0) -%}"
    "{%- macro render_content(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for item in content -%}"
    "{%- if item.type == 'image' or 'image' in item or 'image_url' in item -%}"
    "{%- set image_count.value = image_count.value + 1 -%}"
    "{%- if add_vision_id -%}{{ 'Picture ' ~ image_count.value ~ ': ' }}{%- endif -%}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif item.type == 'video' or 'video' in item -%}"
    "{%- set video_count.value = video_count.value + 1 -%}"
    "{%- if add_vision_id -%}{{ 'Video ' ~ video_count.value ~ ': ' }}{%- endif -%}"
    "{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif 'text' in item -%}{{ item.text }}"
    "{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if tools -%}"
    "{{ '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' -%}{{ render_content(messages[0].content) ~ '\\n\\n' }}{%- endif -%}"
    "{{ '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools -%}{{ '\\n' ~ (tool | tojson) }}{%- endfor -%}"
    "{{ '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n\' }}'
    "{%- elif messages[0].role == 'system' -%}"
    "{{ '<|im_start|>system\\n' ~ render_content(messages[0].content) ~ '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) -%}"
    "{{ '<|im_start|>' ~ message.role ~ '\\n' ~ render_content(message.content) ~ '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' -%}"
    "{{ '<|im_start|>assistant\\n' ~ render_content(message.content or '') }}"
    "{%- for tool_call in message.tool_calls or [] -%}"
    "{%- set call = tool_call.function if tool_call.function else tool_call -%}"
    "{%- if loop.first and message.content -%}{{ '\\n' }}{%- endif -%}"
    '{{ \'<tool_call>\\n{"name": "\' ~ call.name ~ \'", "arguments": \' }}'
    "{{- call.arguments if call.arguments is string else (call.arguments | tojson) -}}"
    "{{ '}\\n</tool_call>' }}"
    "{%- endfor -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' -%}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}{{ '<|im_start|>user' }}{%- endif -%}"
    "{{ '\\n<tool_response>\\n' ~ render_content(message.content) ~ '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' -%}{{ '<|im_end|>\\n' }}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


@dataclass(frozen=True)
class Family:
    """What differs between the tiny Qwen-VL families: classes, vision config, preprocessing."""

    model_class: type[PreTrainedModel]
    config_class: type
    processor_class: type[ProcessorMixin]
    video_processor_class: type
    vision_config: dict[str, Any]
    rope_parameters: dict[str, Any]
    chat_template: str
    patch_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    # Non-special added tokens the real tokenizer carries after the special ones.
    extra_tokens: tuple[str, ...] = ()
    text_config_extra: dict[str, Any] = field(default_factory=dict)


_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

FAMILIES: dict[str, Family] = {
    "qwen2-vl": Family(
        model_class=Qwen2VLForConditionalGeneration,
        config_class=Qwen2VLConfig,
        processor_class=Qwen2VLProcessor,
        video_processor_class=Qwen2VLVideoProcessor,
        vision_config={
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": TEXT_HIDDEN,
            "mlp_ratio": 2,
            "num_heads": 2,
            "hidden_act": "quick_gelu",
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        # The real [16, 24, 24] splits half of a 128-wide head; this splits half of a 16-wide one.
        rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1_000_000.0},
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
        patch_size=14,
        image_mean=_CLIP_MEAN,
        image_std=_CLIP_STD,
    ),
    "qwen2.5-vl": Family(
        model_class=Qwen2_5_VLForConditionalGeneration,
        config_class=Qwen2_5_VLConfig,
        processor_class=Qwen2_5_VLProcessor,
        video_processor_class=Qwen2VLVideoProcessor,
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "hidden_act": "silu",
            "out_hidden_size": TEXT_HIDDEN,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "tokens_per_second": 2,
            "window_size": 112,
            # As in the real model, the last block of the group attends over the whole image.
            "fullatt_block_indexes": [1],
        },
        rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1_000_000.0},
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
        patch_size=14,
        image_mean=_CLIP_MEAN,
        image_std=_CLIP_STD,
        extra_tokens=("<tool_call>", "</tool_call>"),
    ),
    "qwen3-vl": Family(
        model_class=Qwen3VLForConditionalGeneration,
        config_class=Qwen3VLConfig,
        processor_class=Qwen3VLProcessor,
        video_processor_class=Qwen3VLVideoProcessor,
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "hidden_act": "gelu_pytorch_tanh",
            "out_hidden_size": TEXT_HIDDEN,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            # A square number, as the real 2304 (48x48) learned position grid.
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": [0],
        },
        # Real Qwen3-VL: [24, 20, 20] of a 128-wide head, interleaved across t/h/w.
        rope_parameters={
            "rope_type": "default",
            "mrope_section": [4, 2, 2],
            "mrope_interleaved": True,
            "rope_theta": 5_000_000.0,
        },
        chat_template=QWEN3_VL_CHAT_TEMPLATE,
        patch_size=16,
        image_mean=(0.5, 0.5, 0.5),
        image_std=(0.5, 0.5, 0.5),
        extra_tokens=(
            "<tool_call>",
            "</tool_call>",
            "<tool_response>",
            "</tool_response>",
            "<think>",
            "</think>",
        ),
        text_config_extra={"head_dim": TEXT_HEAD_DIM, "attention_bias": False, "rms_norm_eps": 1e-6},
    ),
}
# The same tiny Qwen3-VL (same weights) with the Thinking variant's chat template.
FAMILIES["qwen3-vl-thinking"] = replace(FAMILIES["qwen3-vl"], chat_template=QWEN3_VL_THINKING_CHAT_TEMPLATE)
# Qwen3-VL-30B-A3B's layout: every decoder layer's MLP is a sparse MoE block (router `mlp.gate`, fused
# expert weights `mlp.experts.gate_up_proj` / `down_proj`); the real one has 128 experts, 8 per token.
FAMILIES["qwen3-vl-moe"] = replace(
    FAMILIES["qwen3-vl"],
    model_class=Qwen3VLMoeForConditionalGeneration,
    config_class=Qwen3VLMoeConfig,
    text_config_extra={
        **FAMILIES["qwen3-vl"].text_config_extra,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        # 2 * 24 and 24 differ from the hidden 64, as in the real model (1536, 768 vs 2048): no expert
        # weight is square, so a transposed expert weight or LoRA delta cannot go unnoticed.
        "moe_intermediate_size": 24,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    },
)


def _tokenizer(family: Family) -> Qwen2Tokenizer:
    vocab, merges = gpt2_style_bpe(num_merges=80)
    for token in (*QWEN_SPECIAL_TOKENS, *family.extra_tokens):
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
        extra_special_tokens=[t for t in QWEN_SPECIAL_TOKENS if t not in ("<|endoftext|>", "<|im_end|>")],
    )
    tokenizer.add_tokens(list(family.extra_tokens), special_tokens=False)
    return tokenizer


def _processor(family: Family, tokenizer: Qwen2Tokenizer) -> ProcessorMixin:
    factor = family.patch_size * 2
    preprocessing = {
        "patch_size": family.patch_size,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": list(family.image_mean),
        "image_std": list(family.image_std),
    }
    # At least 2x2 merged patches: Qwen2-VL's real minimum (56*56). Qwen3-VL's real minimum is 256*256,
    # lowered here so a small test image stays a few tokens instead of being upscaled to 64.
    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": (factor * 2) ** 2, "longest_edge": factor * factor * 1280}, **preprocessing
    )
    video_processor = family.video_processor_class(
        size={"shortest_edge": (factor * 2) ** 2, "longest_edge": factor * factor * 768}, **preprocessing
    )
    return family.processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=family.chat_template,
    )


def _padded_vocab_size(tokenizer: Qwen2Tokenizer) -> int:
    # The real checkpoints pad the embedding past the tokenizer (151936 rows for 151665 tokens).
    return -(-len(tokenizer) // 64) * 64


def build(name: str, folder: Path) -> None:
    """Write the tiny model `name` (a key of FAMILIES) and its processor into `folder`."""
    family = FAMILIES[name]
    torch.manual_seed(SEED)
    tokenizer = _tokenizer(family)
    token_id = tokenizer.convert_tokens_to_ids
    text_config = {
        "vocab_size": _padded_vocab_size(tokenizer),
        "hidden_size": TEXT_HIDDEN,
        "intermediate_size": TEXT_HIDDEN * 2,
        "num_hidden_layers": 2,
        "num_attention_heads": TEXT_HEADS,
        "num_key_value_heads": TEXT_KV_HEADS,
        "max_position_embeddings": 4096,
        "initializer_range": TEXT_INITIALIZER_RANGE,
        "rope_parameters": family.rope_parameters,
        "bos_token_id": token_id("<|endoftext|>"),
        "eos_token_id": token_id("<|im_end|>"),
        "pad_token_id": token_id("<|endoftext|>"),
        **family.text_config_extra,
    }
    config = family.config_class(
        text_config=text_config,
        vision_config=family.vision_config,
        image_token_id=token_id("<|image_pad|>"),
        video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    model = family.model_class(config)
    model.generation_config = GenerationConfig(
        bos_token_id=token_id("<|endoftext|>"),
        eos_token_id=[token_id("<|im_end|>"), token_id("<|endoftext|>")],
        pad_token_id=token_id("<|endoftext|>"),
    )
    model.save_pretrained(folder, safe_serialization=True)
    _processor(family, tokenizer).save_pretrained(folder)
