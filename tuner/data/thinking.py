"""Reasoning ("thinking") in assistant replies, and the `data.thinking` policy that decides what trains.

**In the data.** An assistant reply may carry its reasoning inline, as a `<think>...</think>` block
that opens the reply, or in a `reasoning_content` (or `reasoning`) field beside `content`, as chat APIs
return it. `load_conversations` puts both into one canonical form, the one Qwen3 templates render::

    <think>\\n{reasoning}\\n</think>\\n\\n{answer}

so every template sees the same text: Instruct templates write it as is, Qwen3 Thinking templates split
it on `</think>` themselves.

**Policy** (`data.thinking`, printed at the start of a run):

* `keep`: each reply trains with its reasoning;
* `strip`: reasoning is removed from every reply (a non-thinking fine-tune of a thinking model); what
  remains is rendered by the template (a Qwen3 Thinking template still writes the empty block it
  writes at inference);
* `empty`: every reply becomes `<think>\\n\\n</think>\\n\\n{answer}` (the empty block hybrid Qwen3
  templates write when thinking is off).

**Earlier turns and multi-turn samples.** Earlier turns are rendered by the model's own chat template,
exactly as at inference. A template that rewrites earlier turns once a later one follows (Qwen3
Thinking drops the reasoning of replies before the last user turn) makes one rendering of the whole
conversation impossible to train on: no single text holds every reply the way inference produced it.
Such a conversation becomes **one sample per assistant reply**: the conversation up to and including
that reply, rendered by the template, with only that reply supervised. Templates that never rewrite
(the Qwen2-VL, Qwen2.5-VL and Qwen3-VL Instruct templates) keep one sample per conversation with
every reply supervised.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Literal, overload

from tuner.data.grounding import BOX_PLACEHOLDER
from tuner.errors import ConfigError

if TYPE_CHECKING:
    from tuner.data.conversations import Conversation

ThinkingPolicy = Literal["keep", "strip", "empty"]
THINKING_POLICIES: dict[str, str] = {
    "keep": "replies train with their reasoning",
    "strip": "reasoning is removed from every reply",
    "empty": "every reply opens with an empty <think></think> block",
}
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
EMPTY_THINK = f"{THINK_OPEN}\n\n{THINK_CLOSE}\n\n"


def canonical_reply(reasoning: str, answer: str) -> str:
    """The reply text with its reasoning in the form Qwen3 templates render it."""
    return f"{THINK_OPEN}\n{reasoning.strip(chr(10))}\n{THINK_CLOSE}\n\n{answer.lstrip(chr(10))}"


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning, answer) of a reply that opens with a `<think>` block; (None, text) otherwise.

    Raises ValueError for a block that is opened and never closed.
    """
    stripped = text.lstrip()
    if not stripped.startswith(THINK_OPEN):
        return None, text
    if THINK_CLOSE not in stripped:
        raise ValueError(f"the reply opens {THINK_OPEN} but never closes it with {THINK_CLOSE}")
    reasoning, _, answer = stripped[len(THINK_OPEN) :].partition(THINK_CLOSE)
    return reasoning.strip("\n"), answer.lstrip("\n")


def describe_policy(policy: str) -> str:
    """The line a run prints about its thinking policy."""
    check_policy(policy)
    return f"data.thinking={policy}: {THINKING_POLICIES[policy]}"


def check_policy(policy: str) -> None:
    if policy not in THINKING_POLICIES:
        raise ConfigError(
            f"data.thinking={policy!r} is not one of {', '.join(THINKING_POLICIES)}",
            hint="set data.thinking to keep, strip or empty",
        )


def apply_thinking(conversation: Conversation, policy: str) -> Conversation:
    """`conversation` with every assistant reply's reasoning kept, stripped or emptied.

    The boxes of the `<box>` placeholders removed with the reasoning go too, so each remaining
    `<box>` still takes its own box (boxes are taken in order over all turns).
    """
    check_policy(policy)
    if policy == "keep":
        return conversation
    messages, boxes = [], []
    remaining = iter(conversation.boxes)
    for message in conversation.messages:
        texts = [part["text"] for part in message["content"] if part["type"] == "text"]
        if message["role"] != "assistant":
            boxes += [next(remaining) for _ in range(sum(text.count(BOX_PLACEHOLDER) for text in texts))]
            messages.append(message)
            continue
        reasoning, answer = split_reasoning("".join(texts))
        for _ in range((reasoning or "").count(BOX_PLACEHOLDER)):
            next(remaining)  # the reasoning's box, removed with it
        boxes += [next(remaining) for _ in range(answer.count(BOX_PLACEHOLDER))]
        reply = answer if policy == "strip" else EMPTY_THINK + answer.lstrip("\n")
        messages.append({**message, "content": [{"type": "text", "text": reply}]})
    return replace(conversation, messages=messages, boxes=tuple(boxes))


def rewrites_earlier_turns(processor, conversation: Conversation) -> bool:
    """Whether the chat template renders some turn differently once a later turn follows it."""
    rendered = ""
    for count in range(1, len(conversation.messages) + 1):
        longer = processor.apply_chat_template(conversation.messages[:count], tokenize=False)
        if not longer.startswith(rendered):
            return True
        rendered = longer
    return False


def reply_prefix(conversation: Conversation, end: int) -> Conversation:
    """The conversation up to and including message `end - 1` (an assistant reply), which alone is
    supervised; images and boxes are cut to those its messages use."""
    messages = conversation.messages[:end]
    image_count = sum(1 for m in messages for part in m["content"] if part["type"] == "image")
    box_count = sum(
        part["text"].count(BOX_PLACEHOLDER)
        for m in messages
        for part in m["content"]
        if part["type"] == "text"
    )
    return replace(
        conversation,
        messages=messages,
        images=conversation.images[:image_count],
        boxes=conversation.boxes[:box_count],
        supervised_replies="last",
    )


class TrainingSamples(Sequence["Conversation"]):
    """The samples a run trains on: each conversation with the thinking policy applied, split into one
    sample per reply when the chat template rewrites earlier turns. Records are read back lazily.
    """

    def __init__(self, records: Sequence[Conversation], policy: str, entries: list[tuple[int, int]]) -> None:
        self._records = records
        self._policy = policy
        # (record index, end of the sample's messages; 0 for the whole conversation)
        self._entries = entries

    @classmethod
    def build(cls, processor, records: Sequence[Conversation], policy: str) -> TrainingSamples:
        """Decide every record's samples (renders each conversation's prefixes once)."""
        check_policy(policy)
        entries: list[tuple[int, int]] = []
        for index in range(len(records)):
            conversation = apply_thinking(records[index], policy)
            if not rewrites_earlier_turns(processor, conversation):
                entries.append((index, 0))
                continue
            entries.extend(
                (index, end + 1)
                for end, message in enumerate(conversation.messages)
                if message["role"] == "assistant"
            )
        return cls(records, policy, entries)

    def __len__(self) -> int:
        return len(self._entries)

    @overload
    def __getitem__(self, index: int) -> Conversation: ...
    @overload
    def __getitem__(self, index: slice) -> TrainingSamples: ...
    def __getitem__(self, index: int | slice) -> Conversation | TrainingSamples:
        if isinstance(index, slice):
            return self.select(range(len(self))[index])
        record, end = self._entries[index]
        conversation = apply_thinking(self._records[record], self._policy)
        return reply_prefix(conversation, end) if end else conversation

    def select(self, indices) -> TrainingSamples:
        """The samples at `indices`, in that order."""
        return TrainingSamples(self._records, self._policy, [self._entries[i] for i in indices])
