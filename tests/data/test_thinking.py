"""Reasoning data: parsing, the data.thinking policy, and samples checked against the real chat templates.

The oracle is the model's own chat template applied to the conversation as a chat API holds it (reasoning
in `reasoning_content`, the answer in `content`): the text tuner trains on must equal it, the part before
the supervised reply must equal the inference prompt (`add_generation_prompt=True`), and the supervised
tokens must be exactly what the model generates after that prompt.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuner.data.conversations import load_conversations
from tuner.data.thinking import TrainingSamples, apply_thinking, describe_policy
from tuner.data.vl_encoding import IGNORE_INDEX, encode_conversation, render_with_reply_spans
from tuner.errors import ConfigError

# Two user turns, each answered with reasoning: the Qwen3 Thinking template drops the first reply's
# reasoning once the second user turn follows it.
API_MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "reasoning_content": "Two plus two.\nThat is four.", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "reasoning_content": "Three plus three is six.", "content": "6"},
]


def _processor(tiny_model, name: str):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model(name))


def _load(folder: Path, records: list[dict]):
    path = folder / "data.jsonl"
    path.write_text("\n".join(json.dumps(record) for record in records), encoding="utf-8")
    return load_conversations(path)


def _oracle_messages(end: int, policy: str) -> list[dict]:
    """API_MESSAGES[:end] as the chat API holds them, with the policy applied by hand."""
    messages = []
    for message in API_MESSAGES[:end]:
        message = dict(message)
        if message["role"] == "assistant" and policy != "keep":
            del message["reasoning_content"]
            if policy == "empty":
                message["content"] = "<think>\n\n</think>\n\n" + message["content"]
        messages.append(message)
    return messages


def _supervised_text(processor, conversation) -> str:
    sample = encode_conversation(processor, conversation)
    return processor.tokenizer.decode(sample.labels[sample.labels != IGNORE_INDEX])


@pytest.mark.parametrize("inline", [True, False])
def test_inline_blocks_and_reasoning_fields_become_one_canonical_reply(tmp_path, inline) -> None:
    reply = (
        {"role": "assistant", "content": "<think>\nLook.\n</think>\n\nA cat."}
        if inline
        else {"role": "assistant", "reasoning": "Look.", "content": "A cat."}
    )
    scan = _load(tmp_path, [{"messages": [{"role": "user", "content": "What?"}, reply]}])
    assert scan.problems == []
    text = scan.conversations[0].messages[1]["content"]
    assert text == [{"type": "text", "text": "<think>\nLook.\n</think>\n\nA cat."}]


@pytest.mark.parametrize(
    ("reply", "kind", "words"),
    [
        ({"role": "assistant", "content": "<think>never closed"}, "bad-reasoning", "never closes"),
        (
            {"role": "assistant", "content": "<think>a</think>b", "reasoning_content": "c"},
            "bad-reasoning",
            "both",
        ),
        ({"role": "assistant", "content": "<think>a</think>b<think>c</think>d"}, "bad-reasoning", "after"),
        ({"role": "assistant", "content": "ok", "reasoning_content": 3}, "bad-type", "non-string reasoning"),
    ],
)
def test_malformed_reasoning_is_a_problem_of_the_record(tmp_path, reply, kind, words) -> None:
    scan = _load(tmp_path, [{"messages": [{"role": "user", "content": "What?"}, reply]}])
    assert len(scan.conversations) == 0
    assert [problem.kind for problem in scan.problems] == [kind] and words in scan.problems[0].what


def test_reasoning_outside_a_reply_is_refused(tmp_path) -> None:
    messages = [
        {"role": "user", "content": "Q", "reasoning_content": "x"},
        {"role": "assistant", "content": "A"},
    ]
    scan = _load(tmp_path, [{"messages": messages}])
    assert [problem.kind for problem in scan.problems] == ["misplaced-reasoning"]


@pytest.mark.parametrize("policy", ["keep", "strip", "empty"])
def test_thinking_template_trains_one_sample_per_reply_exactly_as_inference_renders_it(
    tiny_model, tmp_path, policy
) -> None:
    processor = _processor(tiny_model, "qwen3-vl-thinking")
    scan = _load(tmp_path, [{"messages": API_MESSAGES}])
    samples = TrainingSamples.build(processor, scan.conversations, policy)
    assert len(samples) == 2  # the template rewrites the first reply once the second user turn follows
    for sample, end in zip(samples, (3, 5), strict=True):
        oracle = _oracle_messages(end, policy)
        text, [(start, stop)] = render_with_reply_spans(processor, sample)
        assert text == processor.apply_chat_template(oracle, tokenize=False)
        prompt = processor.apply_chat_template(oracle[:-1], tokenize=False, add_generation_prompt=True)
        assert text[:start] == prompt  # training's context is exactly the inference prompt
        assert text[start:stop] == text[len(prompt) :].rstrip()
        generated = text[len(prompt) :].rstrip()  # what the model writes after the prompt
        assert _supervised_text(processor, sample) == generated
        answer = API_MESSAGES[end - 1]
        if policy == "keep":
            assert generated == f"{answer['reasoning_content']}\n</think>\n\n{answer['content']}<|im_end|>"
        else:  # the template writes an empty block for the last reply, and the prompt opens it
            assert generated == f"\n</think>\n\n{answer['content']}<|im_end|>"
    # The first reply's reasoning is in its own sample only: the second sample shows the first reply the
    # way the template renders a past turn, without its reasoning, and does not supervise it.
    assert "Two plus two" not in render_with_reply_spans(processor, samples[1])[0]


@pytest.mark.parametrize("policy", ["keep", "strip", "empty"])
def test_instruct_template_keeps_one_sample_with_every_reply_supervised(tiny_model, tmp_path, policy) -> None:
    processor = _processor(tiny_model, "qwen3-vl")
    scan = _load(tmp_path, [{"messages": API_MESSAGES}])
    [sample] = TrainingSamples.build(processor, scan.conversations, policy)
    text, _ = render_with_reply_spans(processor, sample)
    blocks = {
        "keep": [
            "<think>\nTwo plus two.\nThat is four.\n</think>\n\n",
            "<think>\nThree plus three is six.\n</think>\n\n",
        ],
        "strip": ["", ""],
        "empty": ["<think>\n\n</think>\n\n"] * 2,
    }[policy]
    expected = f"{blocks[0]}4<|im_end|>{blocks[1]}6<|im_end|>"
    assert _supervised_text(processor, sample) == expected
    if policy == "strip":
        # A non-thinking fine-tune: no think block anywhere, in training or in the inference prompt.
        assert "<think>" not in text
        prompt = processor.apply_chat_template(
            sample.messages[:-1], add_generation_prompt=True, tokenize=False
        )
        assert "<think>" not in prompt and text.startswith(prompt)


def test_strip_and_empty_leave_replies_without_reasoning_alone_or_empty_them(tmp_path) -> None:
    scan = _load(
        tmp_path, [{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}]
    )
    conversation = scan.conversations[0]
    assert apply_thinking(conversation, "strip").messages == conversation.messages
    assert (
        apply_thinking(conversation, "empty").messages[1]["content"][0]["text"] == "<think>\n\n</think>\n\nA"
    )


def test_policy_is_described_and_unknown_policies_are_refused() -> None:
    assert describe_policy("strip") == "data.thinking=strip: reasoning is removed from every reply"
    with pytest.raises(ConfigError, match=r"data\.thinking='maybe'"):
        describe_policy("maybe")
