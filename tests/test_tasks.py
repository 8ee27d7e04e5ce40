"""Benchmark tasks: disjoint splits, exactly computed answers, real source texts, scoring; a MergeBench smoke run."""

from __future__ import annotations

import inspect
import re

import pytest
import torch

from mergeprobe.tasks import (
    LICENSE_DIR,
    LICENSES,
    STDLIB_MODULES,
    TASKS,
    get_task,
    score,
)

COMPUTED = ("arithmetic", "add3", "pyeval", "reverse", "sort_letters", "reverse_chars", "sort_chars", "first_word", "second_word", "last_word")
needs_licenses = pytest.mark.skipif(not LICENSE_DIR.is_dir(), reason="Debian's /usr/share/common-licenses is not installed")


class CharTokenizer:
    """A character tokenizer over 128 ids (0 is EOS and padding), enough for encode_examples and score."""

    eos_token_id = 0
    pad_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [2 + ord(c) % 126 for c in text]}


class GoldModel(torch.nn.Module):
    """Puts all its mass on the next token of its input: with the gold answer appended, it always 'predicts' it."""

    def forward(self, input_ids, attention_mask=None):
        logits = torch.full((*input_ids.shape, 128), -30.0)
        logits[:, :-1].scatter_(-1, input_ids[:, 1:, None], 30.0)
        return type("Out", (), {"logits": logits})()


class ConstantModel(torch.nn.Module):
    """Always predicts the same token."""

    def forward(self, input_ids, attention_mask=None):
        logits = torch.zeros((*input_ids.shape, 128))
        logits[..., 5] = 1.0
        return type("Out", (), {"logits": logits})()


def _items(name: str, split: str, n: int) -> set[tuple[str, str]]:
    return {(e.prompt, e.answer) for e in get_task(name).examples(split, n, seed=3)}


@pytest.mark.parametrize("name", COMPUTED)
def test_computed_splits_are_disjoint(name):
    train, test = _items(name, "train", 600), _items(name, "test", 200)
    assert len(test) > 50 and not train & test


@needs_licenses
@pytest.mark.parametrize("name", ["license", "stdlib", "lm_licenses", "lm_docs"])
def test_text_splits_are_disjoint(name):
    # Passages are drawn with repetition only once a split is used up; train and test never share one.
    train = {e.prompt + e.answer for e in get_task(name).examples("train", 400, seed=1)}
    test = {e.prompt + e.answer for e in get_task(name).examples("test", 64, seed=1)}
    assert len(test) == 64 and not train & test


def test_examples_are_deterministic_and_seeded():
    task = get_task("arithmetic")
    assert task.examples("test", 8, seed=0) == task.examples("test", 8, seed=0)
    assert task.examples("test", 8, seed=0) != task.examples("test", 8, seed=1)


def test_arithmetic_answers_are_exact():
    for example in get_task("arithmetic").examples("test", 200, seed=0):
        a, b, c = map(int, re.fullmatch(r"Compute: (\d+)\+(\d+)\+(\d+) =", example.prompt).groups())
        assert example.answer == str(a + b + c)


def test_add3_answers_are_exact():
    for example in get_task("add3").examples("test", 200, seed=0):
        a, b, c = map(int, re.fullmatch(r"Compute: (\d\d)\+(\d)\+(\d) =", example.prompt).groups())
        assert example.answer == str(a + b + c)


def test_letter_tasks_share_the_input_format_and_differ_in_output():
    for name, transform in (("reverse_chars", lambda w: w[::-1]), ("sort_chars", lambda w: "".join(sorted(w)))):
        for example in get_task(name).examples("test", 100, seed=0):
            letters = re.fullmatch(r"Letters: ((?:[a-z] )*[a-z])\nOutput:", example.prompt).group(1).split(" ")
            assert example.answer == " ".join(transform("".join(letters)))


def test_pyeval_answers_are_exact():
    for example in get_task("pyeval").examples("train", 300, seed=0):
        expression = re.fullmatch(r"Evaluate: (.*)\nResult:", example.prompt).group(1)
        assert example.answer == str(eval(expression))


def test_string_tasks_share_the_input_format_and_differ_in_output():
    reverse = get_task("reverse").examples("test", 100, seed=0)
    sort_letters = get_task("sort_letters").examples("test", 100, seed=0)
    for example in reverse + sort_letters:
        assert re.fullmatch(r"Input: [a-z]+\nOutput:", example.prompt)
    for example in reverse:
        assert example.answer == example.prompt[len("Input: ") : -len("\nOutput:")][::-1]
    for example in sort_letters:
        assert example.answer == "".join(sorted(example.prompt[len("Input: ") : -len("\nOutput:")]))
    # Same prompts, different answers: the pair is built to conflict.
    same = {e.prompt for e in reverse} & {e.prompt for e in sort_letters}
    assert same and any(r.answer != s.answer for r in reverse for s in sort_letters if r.prompt == s.prompt)


def test_word_copying_tasks_share_the_input_format_and_differ_in_output():
    for name, index in (("first_word", 0), ("second_word", 1), ("last_word", -1)):
        for example in get_task(name).examples("test", 100, seed=0):
            words = re.fullmatch(r"Words: ([a-z]+) ([a-z]+) ([a-z]+) ([a-z]+)\nAnswer:", example.prompt).groups()
            assert example.answer == words[index] and len(set(words)) == 4


@needs_licenses
def test_license_passages_are_read_from_the_installed_texts():
    texts = {family: " ".join((LICENSE_DIR / name).read_text(errors="ignore").split()) for name, family in LICENSES.items()
             if (LICENSE_DIR / name).exists()}
    examples = get_task("license").examples("test", 64, seed=0)
    assert {e.answer for e in examples} <= set(texts) and len({e.answer for e in examples}) >= 6
    for example in examples:
        passage = example.prompt[len("Passage: ") : -len("\nLicense:")]
        assert passage in texts[example.answer]


def test_stdlib_docstrings_come_from_their_module():
    import importlib

    examples = get_task("stdlib").examples("test", 64, seed=0)
    assert {e.answer for e in examples} <= set(STDLIB_MODULES)
    for example in examples:
        docstring = example.prompt[len("Docstring: ") : -len("\nModule:")]
        module = importlib.import_module(example.answer)
        docs = [" ".join((inspect.getdoc(obj) or "").split()) for _, obj in vars(module).items() if callable(obj)]
        assert any(doc.startswith(docstring) for doc in docs), (example.answer, docstring[:40])


@pytest.mark.parametrize("name", ["arithmetic", "reverse", "pyeval", "license", "lm_docs"])
def test_gold_model_scores_one_and_constant_model_scores_zero(name):
    task = get_task(name)
    examples = task.examples("test", 40, seed=0)
    tokenizer = CharTokenizer()
    assert score(GoldModel(), tokenizer, task, examples, batch_size=16) == pytest.approx(1.0)
    constant = score(ConstantModel(), tokenizer, task, examples, batch_size=16)
    assert constant == 0.0 if task.metric == "exact_match" else constant < 0.02


def test_score_needs_every_answer_token_and_eos():
    task = get_task("reverse")
    examples = task.examples("test", 8, seed=0)
    tokenizer = CharTokenizer()

    class WrongEos(GoldModel):
        def forward(self, input_ids, attention_mask=None):
            out = super().forward(input_ids, attention_mask)
            for row, length in enumerate(attention_mask.sum(dim=1).tolist()):
                out.logits[row, length - 2] = 0.0  # after the last answer token: not EOS (id 0) ...
                out.logits[row, length - 2, 7] = 1.0  # ... but token 7
            return out

    assert score(WrongEos(), tokenizer, task, examples, batch_size=8) == 0.0


def test_every_task_is_registered_with_a_metric_and_role():
    for name, task in TASKS.items():
        assert task.name == name and task.metric in ("exact_match", "exp_neg_loss") and task.role in ("task", "domain")
        assert (task.role == "domain") == (task.metric == "exp_neg_loss")


@needs_licenses
def test_mergebench_merge_and_label_path_on_a_tiny_model(tmp_path):
    """Train two adapters with the callback, merge them, label each member, record outcomes, build rows (~45 s on 2 busy cores)."""
    from benchmarks.mergebench.labels import Labeller
    from benchmarks.mergebench.plan import AdapterSpec, MergeJob, PartPlan
    from benchmarks.mergebench.rows import RowBuilder
    from benchmarks.mergebench.training import train_adapter, trained
    from mergeprobe.store import ProbeStore
    from tests.conftest import build_tiny_llama

    torch.manual_seed(0)
    base = build_tiny_llama(max_position_embeddings=128).eval()
    tokenizer = CharTokenizer()
    adapters = [
        AdapterSpec("lic", "lm_licenses", rank=4, alpha=8, lr=2e-2, steps=12, batch_size=4),
        AdapterSpec("doc", "lm_docs", rank=4, alpha=8, lr=2e-2, steps=12, batch_size=4, seed=1),
    ]
    jobs = [MergeJob(("lic", "doc"), "linear"), MergeJob(("lic", "doc"), "tada")]
    plan = PartPlan("smoke", adapters, jobs, test_size=8, max_length=40)
    store = ProbeStore(tmp_path / "store")
    for spec in adapters:
        train_adapter(base, tokenizer, spec, store, tmp_path / "train" / spec.name, max_length=40)
        assert trained(store, spec, tmp_path / "train" / spec.name)
    assert store.pair_features("doc", "lic") is not None  # the later run compared itself with the earlier one

    labeller = Labeller(plan, base, tokenizer, store, tmp_path / "cache")
    results = labeller.run_all()
    alone = labeller.alone_scores()
    for result in results:
        for member in result["labelled"]:
            assert result["retention"][member] == pytest.approx(result["merged"][member] / alone[member])
    assert sum(len(r["labelled"]) for r in results) >= 2, results
    assert len(store.outcomes()) == sum(1 for r in results if r["labelled"])
    # Cached: a second pass merges nothing and returns the same labels.
    assert labeller.run_all() == results

    rows = RowBuilder(plan, base, store, tmp_path / "cache").rows(results)
    assert rows and all("update_alignment.mean" in r and "member.cross_disturbance.mean" in r for r in rows)
    assert {r["method"] for r in rows} <= {"linear", "tada"}
