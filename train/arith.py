"""Grade-school arithmetic word problems: an offline instruction task with an exact-match metric.

A problem is drawn from one of a few templates (people's names and objects filled in; one-step
``+``, ``−``, ``×`` and two-step mixes), its answer a non-negative integer::

    Q: Mia has 4 boxes with 7 pencils in each box, and 5 more pencils. How many pencils does Mia have?
    A: 4 * 7 = 28. 28 + 5 = 33. The answer is 33.

**Answer format.** The assistant turn is the worked equations, then ``The answer is N.``: the
equations give a small model the intermediate result to copy (as GSM8K's solutions do), and the
fixed closing sentence makes the answer easy to find. `parse_answer` reads the number after the
last "answer is" and otherwise the last number in the text (so a base model that replies
``4 * 7 + 5 = 33`` is graded on 33); thousands separators and a trailing ``.0`` are accepted.
A reply is correct when the parsed number equals the answer (`is_correct`).

**Determinism and split.** Problem i of the stream of seed s is drawn from
``numpy.random.default_rng([s, i])`` (`problem_stream`). A problem belongs to the held-out split
when the first 8 hex digits of the sha256 of its question text are 0 mod 5 (about 20%), else to
the training split (`split_of`), so the two are disjoint by construction (a question text is in
exactly one) and the held-out set does not depend on how many training problems are drawn.
`problems(split, n, seed)` is the first n distinct questions of that split in stream order.

**Why a plain generator, not a tfds builder** (as `train.data`'s): the data are a pure function
of (seed, index), a few thousand problems take well under a second to generate, and nothing is
downloaded or prepared, so tfds would add TensorFlow's start-up and a cache directory for nothing.

**Tokenization** (`encode`): the prompt is the user turn rendered through the model's chat template
(`LlamaTokenizer.chat_ids`, generation prompt included); the target is the answer text followed by
the end-of-turn token (``<|im_end|>`` for ChatML), so the model also learns to stop. ``loss_mask``
marks exactly the target tokens: the prompt (system message included) carries no loss.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Iterator, Sequence

import numpy as np

NAMES = ("Mia", "Noah", "Emma", "Liam", "Ava", "Lucas", "Sofia", "Ethan", "Zoe", "Omar", "Lena", "Ravi",
         "Chloe", "Mateo", "Hana", "Jonas", "Priya", "Kofi", "Nora", "Diego", "Aisha", "Felix", "Yuki", "Sam")
OBJECTS = ("apples", "pencils", "marbles", "stickers", "cookies", "books", "coins", "shells", "cards",
           "balloons", "stamps", "crayons", "oranges", "buttons", "toy cars", "flowers", "eggs", "beads")
CONTAINERS = ("boxes", "bags", "jars", "baskets", "packs", "trays")

SPLITS = ("train", "test")
HELD_OUT_MOD = 5  # a problem is held out when sha256(question) % 5 == 0


@dataclasses.dataclass(frozen=True)
class Problem:
    question: str
    solution: str  # the worked equations, e.g. "4 * 7 = 28. 28 + 5 = 33."
    answer: int
    kind: str

    @property
    def target(self) -> str:
        """The assistant turn trained on."""
        return f"{self.solution} The answer is {self.answer}."


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def make_problem(rng: np.random.Generator) -> Problem:
    """One problem from `rng` (see the module docstring)."""
    kind = _pick(rng, ("add", "sub", "mul", "add_sub", "mul_add", "mul_sub", "add_mul"))
    n1 = _pick(rng, NAMES)
    n2 = _pick(rng, tuple(n for n in NAMES if n != n1))
    obj = _pick(rng, OBJECTS)
    box = _pick(rng, CONTAINERS)
    r = lambda lo, hi: int(rng.integers(lo, hi + 1))  # noqa: E731
    if kind == "add":
        a, b = r(2, 99), r(2, 99)
        q = f"{n1} has {a} {obj}. {n2} gives {n1} {b} more {obj}. How many {obj} does {n1} have now?"
        return Problem(q, f"{a} + {b} = {a + b}.", a + b, kind)
    if kind == "sub":
        a = r(10, 99)
        b = r(1, a - 1)
        q = f"{n1} had {a} {obj} and gave {b} of them to {n2}. How many {obj} does {n1} have left?"
        return Problem(q, f"{a} - {b} = {a - b}.", a - b, kind)
    if kind == "mul":
        a, b = r(2, 12), r(2, 12)
        q = f"{n1} buys {a} {box} of {obj}. Each of the {box} holds {b} {obj}. How many {obj} does {n1} buy?"
        return Problem(q, f"{a} * {b} = {a * b}.", a * b, kind)
    if kind == "add_sub":
        a, b = r(5, 60), r(5, 60)
        c = r(1, a + b - 1)
        q = (f"{n1} has {a} {obj} and finds {b} more. Then {n1} gives {c} {obj} to {n2}. "
             f"How many {obj} does {n1} have left?")
        return Problem(q, f"{a} + {b} = {a + b}. {a + b} - {c} = {a + b - c}.", a + b - c, kind)
    if kind == "mul_add":
        a, b, c = r(2, 9), r(2, 12), r(1, 30)
        q = (f"{n1} has {a} {box} with {b} {obj} in each, and {c} more {obj} on the table. "
             f"How many {obj} does {n1} have in all?")
        return Problem(q, f"{a} * {b} = {a * b}. {a * b} + {c} = {a * b + c}.", a * b + c, kind)
    if kind == "mul_sub":
        a, b = r(2, 9), r(3, 12)
        c = r(1, a * b - 1)
        q = (f"A shop has {a} {box} of {obj} with {b} {obj} in each. {n1} buys {c} of the {obj}. "
             f"How many {obj} are left in the shop?")
        return Problem(q, f"{a} * {b} = {a * b}. {a * b} - {c} = {a * b - c}.", a * b - c, kind)
    # add_mul
    a, b, c = r(1, 15), r(1, 15), r(2, 7)
    q = (f"Every day {n1} collects {a} {obj} in the morning and {b} {obj} in the evening. "
         f"How many {obj} does {n1} collect in {c} days?")
    return Problem(q, f"{a} + {b} = {a + b}. {a + b} * {c} = {(a + b) * c}.", (a + b) * c, kind)


def problem_stream(seed: int = 0) -> Iterator[Problem]:
    """Problem i is ``make_problem(default_rng([seed, i]))``, for i = 0, 1, ..."""
    i = 0
    while True:
        yield make_problem(np.random.default_rng([seed, i]))
        i += 1


def split_of(question: str) -> str:
    """``"test"`` (held out) or ``"train"``, from the question text alone."""
    h = int(hashlib.sha256(question.encode("utf-8")).hexdigest()[:8], 16)
    return "test" if h % HELD_OUT_MOD == 0 else "train"


def problems(split: str, n: int, seed: int = 0) -> list[Problem]:
    """The first `n` distinct questions of `split` in the stream of `seed`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    out, seen = [], set()
    for p in problem_stream(seed):
        if len(out) == n:
            break
        if p.question not in seen and split_of(p.question) == split:
            seen.add(p.question)
            out.append(p)
    return out


# --------------------------------------------------------------------------------------------
# the metric

_ANSWER_IS = re.compile(r"answer\s+is\s*:?\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)", re.I)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _to_int(s: str) -> int | None:
    s = s.rstrip(",")
    if not re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?|-?\d+(\.\d+)?", s):
        return None
    x = float(s.replace(",", ""))
    return int(x) if x == int(x) else None


def parse_answer(text: str) -> int | None:
    """The integer a reply gives as its answer: after the last "answer is", else the last number
    in the text; None when there is none (or it is not an integer, e.g. ``2.5``)."""
    hits = _ANSWER_IS.findall(text)
    if hits:
        return _to_int(hits[-1])
    nums = _NUMBER.findall(text)
    return _to_int(nums[-1]) if nums else None


def is_correct(text: str, answer: int) -> bool:
    return parse_answer(text) == answer


# --------------------------------------------------------------------------------------------
# tokenization


def end_of_turn_id(tok) -> int:
    """The token that closes an assistant turn: ``<|im_end|>`` in ChatML, else the eos."""
    i = tok.tokenizer.token_to_id("<|im_end|>")
    if i is None:
        i = tok.eos_id
    if i is None:
        raise ValueError("the tokenizer has neither <|im_end|> nor an eos token")
    return int(i)


def prompt_ids(tok, p: Problem) -> list[int]:
    """The user turn through the chat template, ending with the assistant's generation prompt."""
    return tok.chat_ids([{"role": "user", "content": p.question}], add_generation_prompt=True)


def target_ids(tok, p: Problem) -> list[int]:
    return tok.encode(p.target, add_special_tokens=False) + [end_of_turn_id(tok)]


def encode(tok, probs: Sequence[Problem], max_len: int | None = None, pad_id: int | None = None) -> dict:
    """Arrays for training: ``input_ids`` (N, L) (prompt + target, right-padded with `pad_id`),
    ``attention_mask`` (1 on real tokens), ``loss_mask`` (1 on the target tokens only),
    ``prompt_len`` (N,) and ``answer`` (N,). L = `max_len`, or the longest example when None;
    an example longer than `max_len` raises `ValueError`."""
    pad = end_of_turn_id(tok) if pad_id is None else pad_id
    rows = [(prompt_ids(tok, p), target_ids(tok, p)) for p in probs]
    longest = max((len(a) + len(b) for a, b in rows), default=0)
    L = longest if max_len is None else max_len
    if longest > L:
        raise ValueError(f"an example has {longest} tokens, more than max_len {L}")
    n = len(rows)
    ids = np.full((n, L), pad, np.int32)
    att = np.zeros((n, L), np.int32)
    loss = np.zeros((n, L), np.int32)
    plen = np.zeros((n,), np.int32)
    for r, (a, b) in enumerate(rows):
        ids[r, :len(a) + len(b)] = a + b
        att[r, :len(a) + len(b)] = 1
        loss[r, len(a):len(a) + len(b)] = 1
        plen[r] = len(a)
    return {"input_ids": ids, "attention_mask": att, "loss_mask": loss, "prompt_len": plen,
            "answer": np.array([p.answer for p in probs], np.int64)}


def longest_example(tok, probs: Sequence[Problem]) -> int:
    return max(len(prompt_ids(tok, p)) + len(target_ids(tok, p)) for p in probs)
