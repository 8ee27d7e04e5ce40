"""Benchmark tasks with exact metrics on held-out data, built from real text on the machine.

Computed tasks (the answer is computed exactly): ``arithmetic`` (three-operand
sums), ``pyeval`` (small Python expressions), ``reverse`` and ``sort_letters`` (string
transformations that share one input format but want different outputs — a pair
built to conflict). Tasks on real text that no one here wrote: ``license`` (name the
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


def _import(name: str) -> Any:
    import importlib

    return importlib.import_module(name)


@lru_cache(maxsize=1)
def _license_passages() -> list[tuple[str, str]]:
    """(passage of 24 words, license family) for every installed license text."""
    if not LICENSE_DIR.is_dir():
        raise FileNotFoundError(f"{LICENSE_DIR} is missing; the license tasks need Debian's base-files package.")
    passages = []
    for file_name, family in LICENSES.items():
        path = LICENSE_DIR / file_name
        if not path.exists():
            continue
        words = path.read_text(errors="ignore").split()
        for start in range(0, max(1, len(words) - 24), 12):
            passages.append((" ".join(words[start : start + 24]), family))
    return passages


@lru_cache(maxsize=1)
def _docstrings() -> list[tuple[str, str]]:
    """(first 30 words of a public function's docstring, module name)."""
    items = []
    for module_name in STDLIB_MODULES:
        module = _import(module_name)
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_") or not callable(obj):
                continue
            doc = inspect.getdoc(obj)
            if not doc or getattr(obj, "__module__", module_name) not in (module_name, None, "posix", "_json", "_heapq", "_random", "binascii"):
                continue
            items.append((" ".join(doc.split()[:30]), module_name))
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
    word = rng.choice(_words())
    if name == "reverse":
        return word, Example(f"Input: {word}\nOutput:", word[::-1])
    if name == "sort_letters":
        return word, Example(f"Input: {word}\nOutput:", "".join(sorted(word)))
    raise KeyError(name)


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
            labels = sorted(by_label)
            # Balanced: draw the label first, so no class dominates (os has most docstrings).
            chosen = []
            for _ in range(n):
                label = labels[rng.randrange(len(labels))]
                chosen.append((rng.choice(by_label[label]), label))
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


@torch.no_grad()
def score(model: Any, tokenizer: Any, task: Task, examples: Sequence[Example], batch_size: int = 32) -> float:
    """The task's metric on ``examples``: exact match (one forward pass per batch) or exp(−loss)."""
    rows = encode_examples(tokenizer, examples)
    was_training = model.training
    model.eval()
    hits = 0
    total_loss = 0.0
    total_tokens = 0
    try:
        for start in range(0, len(rows), batch_size):
            batch = collate(rows[start : start + batch_size], pad_id=tokenizer.pad_token_id or 0)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            targets = batch["labels"][:, 1:]
            predicted = logits[:, :-1]
            answer = targets != -100
            if task.metric == "exact_match":
                correct = (predicted.argmax(-1) == targets) | ~answer
                hits += int(correct.all(dim=1).sum())
            else:
                losses = torch.nn.functional.cross_entropy(predicted.reshape(-1, predicted.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum")
                total_loss += float(losses)
                total_tokens += int(answer.sum())
    finally:
        model.train(was_training)
    if task.metric == "exact_match":
        return hits / max(1, len(rows))
    return math.exp(-total_loss / max(1, total_tokens))
