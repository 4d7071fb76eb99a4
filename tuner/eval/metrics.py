"""Answer-scoring metrics for `tuner eval qwenvl` and in-training evaluation, each a small pure function.

Every metric scores one answer against one or more references and returns a number in [0, 1]
(1 = perfect); the best-matching reference counts. They are written out here (no nltk, rouge-score or
sacrebleu dependency) and unit-tested against hand-computed values:

- `exact_match`: the stripped strings are equal.
- `normalised_match`: equal after `normalise` (case, punctuation, whitespace, articles, number words
  and thousands separators), as SQuAD-style evaluation does.
- `anls`: Average Normalised Levenshtein Similarity (DocVQA, ST-VQA): 1 - edit distance / longer length
  on lower-cased, whitespace-collapsed strings, 0 when that distance is 0.5 or more.
- `choice_accuracy`: the option letter of the answer equals the reference's ("B", "(B)", "B. cat",
  "The answer is B", "I think the answer is B"; the article in "A cat is shown" names no option).
- `box_iou`, `box_accuracy`: intersection over union of grounding boxes, and IoU >= 0.5 (acc@0.5).
  Boxes are read in every Qwen-VL convention (`parse_boxes`); references and answers of one family use
  the same coordinates, so IoU compares them directly.
- `rouge_l`: ROUGE-L F1 over lower-cased alphanumeric tokens (longest common subsequence).
- `bleu`: sentence BLEU-4 (geometric mean of 1- to 4-gram precisions times the brevity penalty), with
  add-one smoothing of the 2- to 4-gram precisions (Lin & Och 2004) so short answers do not score 0.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

Box = tuple[float, float, float, float]

_NUMBER_WORDS = {
    word: str(value)
    for value, word in enumerate(
        [
            "zero",
            "one",
            "two",
            "three",
            "four",
            "five",
            "six",
            "seven",
            "eight",
            "nine",
            "ten",
            "eleven",
            "twelve",
        ]
    )
}
_ARTICLES = {"a", "an", "the"}
# Punctuation to drop; a '.' between digits (a decimal point) is kept by `normalise` first.
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def normalise(text: str) -> str:
    """Lower case, number words as digits, no thousands separators, trailing `.0`, punctuation or
    articles, single spaces: `The  Answer is TWO.` -> `answer is 2`."""
    text = text.lower().strip()
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)  # 1,000 -> 1000
    text = re.sub(r"(\d)\.0+\b", r"\1", text)  # 3.0 -> 3
    text = re.sub(r"(\d)\.(\d)", r"\1\0\2", text)  # keep decimal points through the punctuation pass
    text = _PUNCTUATION.sub(" ", text).replace("\0", ".")
    words = [_NUMBER_WORDS.get(word, word) for word in text.split()]
    return " ".join(word for word in words if word not in _ARTICLES)


def exact_match(answer: str, references: Sequence[str]) -> float:
    return float(any(answer.strip() == reference.strip() for reference in references))


def normalised_match(answer: str, references: Sequence[str]) -> float:
    return float(any(normalise(answer) == normalise(reference) for reference in references))


def levenshtein(first: str, second: str) -> int:
    """Edits (insert, delete, substitute one character) that turn `first` into `second`."""
    if len(first) < len(second):
        first, second = second, first
    previous = list(range(len(second) + 1))
    for row, char in enumerate(first, start=1):
        current = [row]
        for column, other in enumerate(second, start=1):
            current.append(
                min(previous[column] + 1, current[column - 1] + 1, previous[column - 1] + (char != other))
            )
        previous = current
    return previous[-1]


def anls(answer: str, references: Sequence[str], threshold: float = 0.5) -> float:
    def similarity(reference: str) -> float:
        left, right = " ".join(answer.lower().split()), " ".join(reference.lower().split())
        longest = max(len(left), len(right))
        if longest == 0:
            return 1.0
        distance = levenshtein(left, right) / longest
        return 1.0 - distance if distance < threshold else 0.0

    return max((similarity(reference) for reference in references), default=0.0)


# "the answer is B", "Answer: (C)", "option D"; a lower-case letter only where it ends the text
# ("answer: b"), so that "the answer is a cat" names no option. The last such phrase counts.
_CHOICE_PHRASE = re.compile(
    r"\b(?i:answer|option|choice)\s*(?:is|:)?\s*(?:\(([A-J])\)|([A-J])(?![A-Za-z])|\(?([a-j])\)?\s*[.!]?\s*$)"
)
_LONE_LETTER = re.compile(r"^\s*\(?([A-Ja-j])\)?\s*[.:)]?\s*$")  # "B", "b", "(c)."
# A leading letter marked as an option: "(B) blue", "B. cat", "B) cat", "B: cat". A bare leading
# capital is not enough: "A cat is shown", "I think so" start with an article and a pronoun.
_MARKED_LETTER = re.compile(r"^\s*(?:\(([A-J])\)|([A-J])\s*[.:)\]])")


def choice_letter(text: str) -> str | None:
    """The option letter a multiple-choice answer names, or None: the letter of its last "the answer is
    X" phrase, else a lone letter, else a leading letter marked as an option."""
    phrases = list(_CHOICE_PHRASE.finditer(text))
    found = phrases[-1] if phrases else _LONE_LETTER.search(text) or _MARKED_LETTER.search(text)
    if found is None:
        return None
    return next(letter for letter in found.groups() if letter).upper()


def choice_accuracy(answer: str, references: Sequence[str]) -> float:
    letter = choice_letter(answer)
    return float(letter is not None and any(choice_letter(ref) == letter for ref in references))


_NUMBER = r"-?\d+(?:\.\d+)?"
# Qwen2-VL: `<|box_start|>(x1,y1),(x2,y2)<|box_end|>` in 0-1000 coordinates (the special tokens are
# dropped by `skip_special_tokens`, the pairs stay). Qwen2.5-VL (absolute pixels) and Qwen3-VL (0-1000):
# JSON such as `{"bbox_2d": [x1, y1, x2, y2], "label": "cat"}`; plain `[x1, y1, x2, y2]` lists too.
_PAIR_BOX = re.compile(
    rf"\(\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\)\s*,?\s*\(\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\)"
)
_LIST_BOX = re.compile(rf"\[\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\]")


def parse_boxes(text: str) -> list[Box]:
    """Every box in `text`, as (x1, y1, x2, y2) with x1 <= x2 and y1 <= y2, in the order written."""
    found = [(match.start(), match.groups()) for match in _PAIR_BOX.finditer(text)]
    found += [(match.start(), match.groups()) for match in _LIST_BOX.finditer(text)]
    boxes = []
    for _, numbers in sorted(found):
        x1, y1, x2, y2 = (float(number) for number in numbers)
        boxes.append((min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)))
    return boxes


def iou(first: Box, second: Box) -> float:
    width = min(first[2], second[2]) - max(first[0], second[0])
    height = min(first[3], second[3]) - max(first[1], second[1])
    intersection = max(width, 0.0) * max(height, 0.0)
    union = _area(first) + _area(second) - intersection
    return intersection / union if union > 0 else 0.0


def _area(box: Box) -> float:
    return (box[2] - box[0]) * (box[3] - box[1])


def box_iou(answer: str, references: Sequence[str]) -> float:
    """Mean over the reference's boxes of the best IoU with any answer box (0 for an answer without one)."""
    predicted = parse_boxes(answer)

    def score(reference: str) -> float:
        wanted = parse_boxes(reference)
        if not wanted or not predicted:
            return 0.0
        return sum(max(iou(box, guess) for guess in predicted) for box in wanted) / len(wanted)

    return max((score(reference) for reference in references), default=0.0)


def box_accuracy(answer: str, references: Sequence[str], threshold: float = 0.5) -> float:
    """1 when every reference box is found with IoU >= `threshold` (acc@0.5), else 0."""
    predicted = parse_boxes(answer)

    def hit(reference: str) -> bool:
        wanted = parse_boxes(reference)
        return bool(wanted) and all(
            any(iou(box, guess) >= threshold for guess in predicted) for box in wanted
        )

    return float(any(hit(reference) for reference in references))


def _tokens(text: str) -> list[str]:
    return re.sub(r"[^0-9a-z]+", " ", text.lower()).split()


def _lcs_length(first: Sequence[str], second: Sequence[str]) -> int:
    previous = [0] * (len(second) + 1)
    for item in first:
        current = [0]
        for column, other in enumerate(second, start=1):
            current.append(previous[column - 1] + 1 if item == other else max(previous[column], current[-1]))
        previous = current
    return previous[-1]


def rouge_l(answer: str, references: Sequence[str]) -> float:
    def f1(reference: str) -> float:
        candidate, target = _tokens(answer), _tokens(reference)
        common = _lcs_length(candidate, target)
        if common == 0:
            return 0.0
        precision, recall = common / len(candidate), common / len(target)
        return 2 * precision * recall / (precision + recall)

    return max((f1(reference) for reference in references), default=0.0)


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def bleu(answer: str, references: Sequence[str], max_order: int = 4) -> float:
    """Sentence BLEU against all references at once (n-gram counts clipped by the most in any one)."""
    candidate = _tokens(answer)
    targets = [_tokens(reference) for reference in references]
    if not candidate or not any(targets):
        return 0.0
    log_precision = 0.0
    for n in range(1, max_order + 1):
        counts = _ngrams(candidate, n)
        allowed: Counter = Counter()
        for target in targets:
            allowed |= _ngrams(target, n)
        matches = sum(min(count, allowed[gram]) for gram, count in counts.items())
        total = sum(counts.values())
        if n == 1:
            if matches == 0:
                return 0.0
            log_precision += math.log(matches / total)
        else:
            log_precision += math.log((matches + 1) / (total + 1))
    # The reference length closest to the answer's (the shorter on a tie), as in the original BLEU.
    closest = min((abs(len(t) - len(candidate)), len(t)) for t in targets)[1]
    brevity = 1.0 if len(candidate) > closest else math.exp(1 - closest / len(candidate))
    return brevity * math.exp(log_precision / max_order)


Metric = Callable[[str, Sequence[str]], float]

METRICS: dict[str, Metric] = {
    "exact_match": exact_match,
    "normalised_match": normalised_match,
    "anls": anls,
    "choice_accuracy": choice_accuracy,
    "box_iou": box_iou,
    "box_accuracy": box_accuracy,
    "rouge_l": rouge_l,
    "bleu": bleu,
}
# What `auto` scores, by the kind of reference; the first metric is the sample's headline score (the one
# the worst samples are ranked by and the overall score averages).
TEXT_METRICS = ("normalised_match", "exact_match", "anls", "rouge_l", "bleu")
CHOICE_METRICS = ("choice_accuracy",)
BOX_METRICS = ("box_accuracy", "box_iou")
_CHOICE_REFERENCE = re.compile(r"^\s*\(?[A-J]\)?\s*[.:)]?\s*$")


def metrics_for(reference: str) -> tuple[str, ...]:
    """The metrics `auto` picks for a reference: boxes -> box metrics; a bare option letter ->
    choice accuracy; anything else -> the text metrics."""
    if parse_boxes(reference):
        return BOX_METRICS
    if _CHOICE_REFERENCE.match(reference):
        return CHOICE_METRICS
    return TEXT_METRICS


def score_answer(
    answer: str, references: Sequence[str], metrics: Sequence[str] | None = None
) -> dict[str, float]:
    """{metric: score} for one answer; `metrics` None picks them from the first reference."""
    chosen = metrics or metrics_for(references[0] if references else "")
    return {name: METRICS[name](answer, references) for name in chosen}
