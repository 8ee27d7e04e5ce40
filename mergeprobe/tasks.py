"""Benchmark tasks with exact metrics on held-out data, built from real text on the machine.

Computed tasks (the answer is computed exactly): ``arithmetic`` (three-operand
sums), ``pyeval`` (small Python expressions), ``reverse`` and ``sort_letters`` (string
transformations that share one input format but want different outputs — a pair
built to conflict), ``add3``, ``reverse_chars`` and ``sort_chars`` (the same skills
on single-letter and single-digit tokens: one token per letter makes them learnable by
SmolLM2-135M in a hundred LoRA steps, where whole-word ``reverse`` and three two-digit
``arithmetic`` were not), ``first_word``, ``second_word`` and ``last_word`` (copy one of four
common words, one token each: a conflicting family, simple enough for the tiny model of
the benchmark's sweep). Tasks on real text that no one here wrote: ``license`` (name the
license of a passage from the texts Debian installs in ``/usr/share/common-licenses``)
and ``stdlib`` (name the standard-library module of a docstring). Domain tasks for
task–domain merging: ``lm_licenses`` and ``lm_docs`` (language modelling; metric
``exp(−loss)``).

Scoring exact match does not decode token by token: with the gold answer appended,
one batched forward pass checks that every answer token (and the end-of-sequence
token) is the argmax given the gold prefix — exactly the condition for greedy
decoding to produce the answer (ALGORITHMS.md §5).

Example
-------
>>> from mergeprobe.tasks import get_task
>>> task = get_task("arithmetic")
>>> ex = task.examples("test", 1, seed=0)[0]
>>> ex.prompt.startswith("Compute:")
True
"""

from __future__ import annotations

import hashlib
import inspect
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

LICENSE_DIR = Path("/usr/share/common-licenses")
LICENSES = {
    "Apache-2.0": "Apache",
    "Artistic": "Artistic",
    "BSD": "BSD",
    "CC0-1.0": "CC0",
    "GFDL-1.3": "GFDL",
    "GPL-3": "GPL",
    "LGPL-2.1": "LGPL",
    "MPL-2.0": "MPL",
}
STDLIB_MODULES = ["json", "os", "re", "math", "string", "itertools", "random", "shutil", "textwrap", "statistics", "heapq", "base64"]


@dataclass(frozen=True)
class Example:
    """One prompt and its gold answer (the answer is appended after a space)."""

    prompt: str
    answer: str


def _held_out(key: str) -> bool:
    """A stable 1-in-4 split by content, so train and test never share an item."""
    return int(hashlib.sha256(key.encode()).hexdigest(), 16) % 4 == 0


@lru_cache(maxsize=1)
def _words() -> list[str]:
    """Distinct lowercase words of 5–8 letters from the license texts (real vocabulary)."""
    words: set[str] = set()
    for file in sorted(LICENSE_DIR.glob("*")) if LICENSE_DIR.is_dir() else []:
        if file.is_file():
            words.update(w for w in re.findall(r"[a-z]+", file.read_text(errors="ignore").lower()) if 5 <= len(w) <= 8)
    if len(words) < 200:  # outside Debian: fall back to the standard library's docstrings
        for module in STDLIB_MODULES:
            words.update(w for w in re.findall(r"[a-z]+", (_import(module).__doc__ or "").lower()) if 5 <= len(w) <= 8)
    return sorted(words)


@lru_cache(maxsize=1)
def _common_words() -> list[str]:
    """The 200 most frequent words of 4–8 letters in the license texts (almost all one BPE token each)."""
    counts: dict[str, int] = {}
    for file in sorted(LICENSE_DIR.glob("*")) if LICENSE_DIR.is_dir() else []:
        if file.is_file():
            for word in re.findall(r"[a-z]+", file.read_text(errors="ignore").lower()):
                if 4 <= len(word) <= 8:
                    counts[word] = counts.get(word, 0) + 1
    if len(counts) < 200:
        return _words()[:200]
    return sorted(sorted(counts), key=lambda w: -counts[w])[:200]


WORD_POSITION = {"first_word": 0, "second_word": 1, "last_word": -1}
"""The copying tasks: which of the four words is the answer."""


def _import(name: str) -> Any:
    import importlib

    return importlib.import_module(name)


PASSAGE_WORDS = 16
"""Words per license passage (short: prompts stay under ~32 tokens, so scoring is cheap)."""
DOCSTRING_WORDS = 20
"""Words kept of each docstring."""


@lru_cache(maxsize=1)
def _license_passages() -> list[tuple[str, str]]:
    """(passage of ``PASSAGE_WORDS`` words, license family) for every installed license text."""
    if not LICENSE_DIR.is_dir():
        raise FileNotFoundError(f"{LICENSE_DIR} is missing; the license tasks need Debian's base-files package.")
    passages = []
    for file_name, family in LICENSES.items():
        path = LICENSE_DIR / file_name
        if not path.exists():
            continue
        words = path.read_text(errors="ignore").split()
        # Non-overlapping passages: a test passage shares no words with a training passage.
        for start in range(0, max(1, len(words) - PASSAGE_WORDS + 1), PASSAGE_WORDS):
            passages.append((" ".join(words[start : start + PASSAGE_WORDS]), family))
    return passages


@lru_cache(maxsize=1)
def _docstrings() -> list[tuple[str, str]]:
    """(first ``DOCSTRING_WORDS`` words of a public function's docstring, module name)."""
    items = []
    for module_name in STDLIB_MODULES:
        module = _import(module_name)
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_") or not callable(obj):
                continue
            doc = inspect.getdoc(obj)
            if not doc or getattr(obj, "__module__", module_name) not in (module_name, None, "posix", "_json", "_heapq", "_random", "binascii"):
                continue
            items.append((" ".join(doc.split()[:DOCSTRING_WORDS]), module_name))
    return items


def _pyeval_expression(rng: random.Random) -> str:
    words = _words()
    templates: list[Callable[[], str]] = [
        lambda: f"len({rng.choice(words)!r}) + {rng.randint(1, 9)}",
        lambda: f"max({rng.randint(0, 40)}, {rng.randint(0, 40)}) - {rng.randint(1, 9)}",
        lambda: f"{rng.choice(words)!r}[{rng.randint(0, 4)}]",
        lambda: f"sorted({rng.choice(words)!r})[0]",
        lambda: f"{rng.randint(2, 9)} * {rng.randint(2, 9)} % {rng.randint(5, 13)}",
        lambda: f"{rng.choice(words)!r}.upper()[:{rng.randint(1, 3)}]",
    ]
    return rng.choice(templates)()


def _generate(name: str, rng: random.Random) -> tuple[str, Example]:
    """One random example of a computed task, with the key that decides its split."""
    if name == "arithmetic":
        a, b, c = rng.randint(10, 99), rng.randint(10, 99), rng.randint(1, 9)
        return f"{a}+{b}+{c}", Example(f"Compute: {a}+{b}+{c} =", str(a + b + c))
    if name == "pyeval":
        expression = _pyeval_expression(rng)
        value = eval(expression, {"__builtins__": {"len": len, "max": max, "sorted": sorted}})  # our own template
        return expression, Example(f"Evaluate: {expression}\nResult:", str(value))
    if name == "add3":
        a, b, c = rng.randint(10, 99), rng.randint(1, 9), rng.randint(1, 9)
        return f"{a}+{b}+{c}", Example(f"Compute: {a}+{b}+{c} =", str(a + b + c))
    if name in ("reverse_chars", "sort_chars"):
        word = rng.choice(_words())
        letters = list(word[::-1]) if name == "reverse_chars" else sorted(word)
        return word, Example(f"Letters: {' '.join(word)}\nOutput:", " ".join(letters))
    if name in WORD_POSITION:
        words = rng.sample(_common_words(), 4)
        return " ".join(words), Example(f"Words: {' '.join(words)}\nAnswer:", words[WORD_POSITION[name]])
    word = rng.choice(_words())
    if name == "reverse":
        return word, Example(f"Input: {word}\nOutput:", word[::-1])
    if name == "sort_letters":
        return word, Example(f"Input: {word}\nOutput:", "".join(sorted(word)))
    raise KeyError(name)


def _balanced_draw(by_label: dict[str, list[str]], n: int, rng: random.Random) -> list[tuple[str, str]]:
    """``n`` (text, label) items, labels in turn (no class dominates: ``os`` has most docstrings).

    Each label's items are shuffled and used without repetition; a label whose items
    are used up drops out of the rotation until every label is used up, then all start
    again. So a split repeats an item only when ``n`` exceeds its size.
    """
    labels = sorted(by_label)
    queues: dict[str, list[str]] = {}
    chosen: list[tuple[str, str]] = []
    while len(chosen) < n:
        if not any(queues.values()):
            queues = {label: rng.sample(by_label[label], len(by_label[label])) for label in labels}
        order = [label for label in labels if queues[label]]
        rng.shuffle(order)
        for label in order[: n - len(chosen)]:
            chosen.append((queues[label].pop(), label))
    return chosen


@dataclass(frozen=True)
class Task:
    """A benchmark task: examples for a split and how to score them.

    Attributes
    ----------
    name:
        Registry name.
    metric:
        ``"exact_match"`` (share of answers greedy decoding would produce) or
        ``"exp_neg_loss"`` (language-modelling tasks).
    role:
        ``"task"`` or ``"domain"`` (for TaDA's task–domain merging).
    """

    name: str
    metric: Literal["exact_match", "exp_neg_loss"]
    role: Literal["task", "domain"]
    description: str

    def examples(self, split: Literal["train", "test"], n: int, seed: int = 0) -> list[Example]:
        """``n`` examples of ``split`` (train and test never share an item)."""
        want_test = split == "test"
        rng = random.Random(f"{self.name}:{split}:{seed}")
        if self.name in ("license", "stdlib", "lm_licenses", "lm_docs"):
            pool = _license_passages() if self.name in ("license", "lm_licenses") else _docstrings()
            items = [p for p in pool if _held_out(p[0]) == want_test]
            if not items:
                raise ValueError(f"task {self.name!r} has no {split} data on this machine")
            by_label: dict[str, list[str]] = {}
            for text, label in items:
                by_label.setdefault(label, []).append(text)
            chosen = _balanced_draw(by_label, n, rng)
            if self.role == "domain":
                return [Example("", text) for text, _ in chosen]
            label = "License:" if self.name == "license" else "Module:"
            head = "Passage" if self.name == "license" else "Docstring"
            return [Example(f"{head}: {text}\n{label}", answer) for text, answer in chosen]
        out: list[Example] = []
        seen = 0
        while len(out) < n:
            key, example = _generate(self.name, rng)
            seen += 1
            if _held_out(key) == want_test:
                out.append(example)
            if seen > 100 * n + 1000:
                raise RuntimeError(f"task {self.name!r} cannot produce {n} distinct {split} examples")
        return out


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("arithmetic", "exact_match", "task", "sum of two two-digit numbers and a digit"),
        Task("pyeval", "exact_match", "task", "value of a small Python expression"),
        Task("reverse", "exact_match", "task", "a word spelled backwards"),
        Task("sort_letters", "exact_match", "task", "a word's letters in alphabetical order (same input format as reverse)"),
        Task("add3", "exact_match", "task", "a two-digit number plus two digits (two carries at most)"),
        Task("reverse_chars", "exact_match", "task", "a word's letters, space-separated, in reverse order"),
        Task("sort_chars", "exact_match", "task", "a word's letters, space-separated, in alphabetical order (same input format as reverse_chars)"),
        Task("first_word", "exact_match", "task", "the first of four common words (copying: learnable by a small model)"),
        Task("second_word", "exact_match", "task", "the second of four common words (same input format as first_word)"),
        Task("last_word", "exact_match", "task", "the last of four common words (same input format as first_word)"),
        Task("license", "exact_match", "task", "the license family of a passage of a Debian license text"),
        Task("stdlib", "exact_match", "task", "the standard-library module of a docstring"),
        Task("lm_licenses", "exp_neg_loss", "domain", "language modelling on license texts"),
        Task("lm_docs", "exp_neg_loss", "domain", "language modelling on standard-library docstrings"),
    )
}


def get_task(name: str) -> Task:
    """The task registered under ``name``."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]


# ------------------------------------------------------------------ tokenising
def encode_examples(tokenizer: Any, examples: Sequence[Example], max_length: int = 96) -> list[dict[str, list[int]]]:
    """Token ids of prompt + " " + answer + EOS, with labels only on the answer and EOS.

    Prompt and answer are tokenised separately and concatenated, so training and
    scoring see the same ids. Domain examples (empty prompt) are labelled everywhere.
    """
    eos = tokenizer.eos_token_id
    rows = []
    for example in examples:
        prompt = tokenizer(example.prompt, add_special_tokens=False)["input_ids"] if example.prompt else []
        answer = tokenizer((" " if example.prompt else "") + example.answer, add_special_tokens=False)["input_ids"] + [eos]
        ids = (prompt + answer)[-max_length:]
        n_answer = min(len(answer), len(ids))
        labels = [-100] * (len(ids) - n_answer) + ids[len(ids) - n_answer :]
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def collate(rows: Sequence[dict[str, list[int]]], pad_id: int = 0) -> dict[str, Tensor]:
    """Right-pad rows into ``input_ids``, ``attention_mask`` and ``labels`` tensors."""
    length = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        ids[i, :n] = torch.tensor(row["input_ids"])
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(row["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class TaskDataset(torch.utils.data.Dataset):
    """A map-style dataset of encoded examples, for ``Trainer`` (use :func:`collate`)."""

    def __init__(self, tokenizer: Any, examples: Sequence[Example], max_length: int = 96):
        self.rows = encode_examples(tokenizer, examples, max_length)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.rows[index]


def _answer_logits(model: Any, batch: dict[str, Tensor], answer: Tensor) -> Tensor:
    """Logits at the positions that predict answer tokens only (``answer`` masks ``input_ids[:, 1:]``).

    For a model with an output embedding (every ``transformers`` causal LM, PEFT-wrapped
    or not) the output layer is applied to those positions alone — on a short answer
    after a long prompt it is most of the vocabulary projection saved. Models with logit
    soft-capping, or without ``get_output_embeddings``, take the plain path.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    if isinstance(head, torch.nn.Linear) and not getattr(config, "final_logit_softcapping", None):
        try:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True, logits_to_keep=1)
        except TypeError:  # a model whose forward takes no logits_to_keep
            out = None
        if out is not None and getattr(out, "hidden_states", None) is not None:
            return head(out.hidden_states[-1][:, :-1][answer])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits[:, :-1][answer]


@torch.no_grad()
def score(model: Any, tokenizer: Any, task: Task, examples: Sequence[Example], batch_size: int = 32) -> float:
    """The task's metric on ``examples``: exact match (one forward pass per batch) or exp(−loss).

    Examples are batched by length, ``batch_size`` at a time, without gradients, in eval
    mode (the model's mode is restored). Exact match counts an example when every answer
    token and the EOS token is the argmax given the gold prefix; ``exp_neg_loss`` is
    ``exp`` of the mean token loss over all answer tokens.
    """
    # Batches of similar length waste little on padding (the sum over examples is order-free).
    rows = sorted(encode_examples(tokenizer, examples), key=lambda row: len(row["input_ids"]))
    was_training = model.training
    model.eval()
    hits = 0
    total_loss = 0.0
    total_tokens = 0
    try:
        for start in range(0, len(rows), batch_size):
            batch = collate(rows[start : start + batch_size], pad_id=tokenizer.pad_token_id or 0)
            targets = batch["labels"][:, 1:]
            answer = targets != -100
            predicted = _answer_logits(model, batch, answer)  # [answer tokens, vocab]
            gold = targets[answer]
            if task.metric == "exact_match":
                wrong = torch.zeros(answer.shape, dtype=torch.bool)
                wrong[answer] = predicted.argmax(-1) != gold
                hits += int((~wrong.any(dim=1)).sum())
            else:
                total_loss += float(torch.nn.functional.cross_entropy(predicted.float(), gold, reduction="sum"))
                total_tokens += int(answer.sum())
    finally:
        model.train(was_training)
    if task.metric == "exact_match":
        return hits / max(1, len(rows))
    return math.exp(-total_loss / max(1, total_tokens))
