"""One conversation record -> the prompt a model answers and the reference its answer is scored against.

Every place that asks a model about a record builds the question here, so they agree on every record:
the sample answers written during training, `tuner eval qwenvl`, in-training evaluation
(`output.eval_data`) and `tuner infer qwenvl --data`.

* **Prompt**: the conversation up to its last reply, with the thinking policy applied as training
  applies it (`tuner.data.thinking.apply_thinking`, each remaining `<box>` still paired with its own
  box) and every `<box>` written in the model family's convention (`tuner.data.grounding.write_boxes`),
  rendered by the processor's own chat template with the assistant header appended.
* **Media**: the images and videos of the prompt turns (a reply never holds any), handed to the
  processor as training hands them: images through `load_image_rgb`, videos as sampled frames with
  their timing (`tuner.data.vl_encoding.video_inputs`).
* **Reference**: the final answer of the last reply as a generated answer reads once decoded (special
  tokens skipped, such as Qwen2-VL's `<|box_start|>`): its `<think>` block is not part of it, and its
  boxes are written like the prompt's, so a model that answers exactly what it trained on scores 1.
  An answer is scored on its final answer too (`scored_answer`): the text after `</think>`, as
  ms-swift and LLaMA-Factory score reasoning models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tuner.data.conversations import Conversation, text_of
from tuner.data.grounding import write_boxes
from tuner.data.images import DEFAULT_MAX_PIXELS, load_image_rgb
from tuner.data.thinking import THINK_CLOSE, THINK_OPEN, apply_thinking, split_reasoning
from tuner.data.video import VideoSampling, VideoSource
from tuner.data.vl_encoding import video_inputs


@dataclass(frozen=True)
class Prompt:
    """What a model is asked (chat messages and the template's text), with what it is shown and the
    answer expected."""

    source: str
    messages: list[dict]
    text: str  # the chat template's rendering, ending in the assistant header
    images: tuple[Path, ...] = ()
    videos: tuple[VideoSource, ...] = ()
    reference: str = ""
    # The last reply as training supervises it (its reasoning too, where the policy keeps it).
    reply: str = ""

    @property
    def question(self) -> str:
        """The text of the last user turn."""
        user = next((m for m in reversed(self.messages) if m["role"] == "user"), None)
        return text_of(user) if user is not None else ""

    @property
    def opens_reasoning(self) -> bool:
        """Whether the template ends the prompt inside an opened `<think>` (Qwen3 Thinking templates
        do): the answer then starts with reasoning that `</think>` closes."""
        return self.text.rfind(THINK_OPEN) > self.text.rfind(THINK_CLOSE)


def prompt_of(
    processor,
    messages: list[dict],
    images: Sequence[Path] = (),
    videos: Sequence[VideoSource] = (),
    source: str = "",
    reference: str = "",
    reply: str = "",
) -> Prompt:
    """A prompt of chat `messages` (one `{"type": "image"}` part per entry of `images`, one
    `{"type": "video"}` per entry of `videos`), rendered for generation."""
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return Prompt(source, messages, text, tuple(images), tuple(videos), reference, reply)


def build_prompt(processor, conversation: Conversation, thinking: str = "keep") -> Prompt:
    """The prompt of `conversation` (all turns before its last reply) and that reply's final answer as
    the reference, with the thinking policy `thinking` applied and boxes written for `processor`."""
    conversation = write_boxes(processor, apply_thinking(conversation, thinking))
    *turns, reply = conversation.messages  # load_conversations: the last turn is the assistant's
    reply_text = text_of(reply)
    _, answer = split_reasoning(reply_text)
    parts = [part["type"] for message in turns for part in message["content"]]
    return prompt_of(
        processor,
        turns,
        conversation.images[: parts.count("image")],
        conversation.videos[: parts.count("video")],
        conversation.source,
        as_decoded(processor, answer).strip(),
        reply_text,
    )


def as_decoded(processor, text: str) -> str:
    """`text` as it reads in an answer decoded with `skip_special_tokens` (how answers are decoded):
    without special tokens such as Qwen2-VL's box markers, the text between them unchanged."""
    tokenizer = processor.tokenizer
    return tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"], skip_special_tokens=True)


def scored_answer(answer: str, prompt: Prompt) -> str:
    """The final answer in a model's `answer`: the text after its reasoning's `</think>`; empty when the
    reasoning never closed (the model ran out of tokens thinking)."""
    if THINK_CLOSE in answer:
        return answer.rpartition(THINK_CLOSE)[2].strip()
    if prompt.opens_reasoning or answer.lstrip().startswith(THINK_OPEN):
        return ""
    return answer.strip()


def model_inputs(
    processor,
    prompts: Sequence[Prompt],
    *,
    background: tuple[int, int, int] = (255, 255, 255),
    max_image_pixels: int = DEFAULT_MAX_PIXELS,
    video: VideoSampling | None = None,
):
    """The processor's tensors for a batch of prompts (padded on the tokenizer's padding side): tokens,
    image pixels and video frames. `video`: how videos become frames (None: the processor's bounds)."""
    images = [load_image_rgb(path, background, max_image_pixels) for p in prompts for path in p.images]
    clips = video_inputs(processor, tuple(v for p in prompts for v in p.videos), video)
    return processor(
        text=[p.text for p in prompts], images=images or None, **clips, padding=True, return_tensors="pt"
    )
