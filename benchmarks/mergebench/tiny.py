"""The tiny model of the sweep: SmolLM2's tokenizer on a reduced vocabulary, a small Llama pretrained from scratch.

:class:`ReducedTokenizer` keeps only the SmolLM2 token ids that the benchmark's texts use
(every task's train and test examples), renumbered densely, so the tiny model's
embedding and output layers are a few thousand rows instead of 49 152. The tiny Llama
is pretrained by :func:`pretrain_tiny` on a mixture of the tasks' training examples
(prompt and answer, full language-modelling loss, the two domain corpora included),
for a fixed number of steps; the sweep's LoRA adapters then specialise it.

Example
-------
>>> tok = ReducedTokenizer([50, 7, 9], eos_id=0)  # doctest: +SKIP
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.mergebench.common import read_json, write_json
from mergeprobe.tasks import collate, encode_examples, get_task

EOS, UNK = 0, 1
VOCAB_FILE = "reduced_vocab.json"


class ReducedTokenizer:
    """SmolLM2's tokenizer restricted to ``kept`` base ids (reduced id ``k`` is base id ``kept[k]``).

    Reduced id 0 is EOS (also the pad token) and 1 stands for any base id outside the
    kept set. Offers what :mod:`mergeprobe.tasks` needs: ``__call__(text,
    add_special_tokens=False)["input_ids"]``, ``eos_token_id``, ``pad_token_id``,
    ``__len__`` and ``decode``.
    """

    def __init__(self, base: Any, kept: list[int]):
        self.base = base
        self.kept = list(kept)
        self.index = {base_id: k for k, base_id in enumerate(self.kept) if k >= 2}
        self.eos_token_id = EOS
        self.pad_token_id = EOS
        self.unk_token_id = UNK

    def __len__(self) -> int:
        return len(self.kept)

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        ids = self.base(text, add_special_tokens=add_special_tokens)["input_ids"]
        return {"input_ids": [self.index.get(i, UNK) for i in ids]}

    def decode(self, ids: list[int]) -> str:
        return self.base.decode([self.kept[i] for i in ids if i >= 2])


def smollm2_tokenizer(cache: Path) -> Any:
    """SmolLM2's tokenizer, read from the GGUF once and cached as a fast tokenizer folder."""
    from transformers import AutoTokenizer

    folder = cache / "smollm2-tokenizer"
    if not (folder / "tokenizer.json").exists():
        from mergeprobe.models import default_model_file

        path = default_model_file()
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        tokenizer.save_pretrained(str(folder))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def reduced_tokenizer(cache: Path, tasks: Sequence[str], examples_per_task: int = 3000) -> ReducedTokenizer:
    """The reduced tokenizer, built once from the examples of ``tasks`` and cached as JSON."""
    base = smollm2_tokenizer(cache.parent)
    stored = read_json(cache / VOCAB_FILE)
    if stored is None:
        used: set[int] = set()
        for task in map(get_task, tasks):
            for split in ("train", "test"):
                for example in task.examples(split, examples_per_task, seed=0):
                    text = f"{example.prompt} {example.answer}" if example.prompt else example.answer
                    used.update(base(text, add_special_tokens=False)["input_ids"])
                    used.update(base(" " + example.answer, add_special_tokens=False)["input_ids"])
        kept = [base.eos_token_id, base.unk_token_id if base.unk_token_id is not None else base.eos_token_id]
        kept += sorted(used - set(kept))
        stored = {"kept": kept}
        write_json(cache / VOCAB_FILE, stored)
    return ReducedTokenizer(base, stored["kept"])


def build_tiny_llama(vocab_size: int, config: dict[str, Any], seed: int = 0) -> Any:
    """A small Llama built from a config (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    llama = LlamaConfig(vocab_size=vocab_size, max_position_embeddings=128, tie_word_embeddings=True,
                        bos_token_id=EOS, eos_token_id=EOS, pad_token_id=EOS, **config)
    return LlamaForCausalLM(llama)


def _pretraining_rows(tokenizer: ReducedTokenizer, tasks: Sequence[str], count: int, max_length: int, seed: int) -> list[dict[str, list[int]]]:
    """``count`` training sequences drawn evenly from ``tasks``; every token is a target (plain language modelling)."""
    per_task = count // len(tasks) + 1
    rows = []
    for task in map(get_task, tasks):
        for row in encode_examples(tokenizer, task.examples("train", per_task, seed=seed), max_length):
            rows.append({"input_ids": row["input_ids"], "labels": list(row["input_ids"])})
    random.Random(seed).shuffle(rows)
    return rows[:count]


def pretrain_tiny(folder: Path, tokenizer: ReducedTokenizer, config: dict[str, Any], tasks: Sequence[str], steps: int,
                  batch_size: int, lr: float, max_length: int = 48, seed: int = 0) -> dict[str, Any]:
    """Pretrain the tiny Llama from scratch (AdamW, warm-up then cosine decay) and save it to ``folder``."""
    from tqdm.auto import tqdm

    model = build_tiny_llama(len(tokenizer), config, seed)
    model.train()
    rows = _pretraining_rows(tokenizer, tasks, steps * batch_size, max_length, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    losses = []
    start = time.perf_counter()
    for step in tqdm(range(steps), desc="pretraining the tiny Llama", unit="step"):
        batch = collate(rows[step * batch_size : (step + 1) * batch_size], pad_id=EOS)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - start
    model.config.name_or_path = "mergebench-tiny-llama"
    model.save_pretrained(str(folder))
    summary = {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seconds": seconds,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "config": config,
        "tasks": list(tasks),
        "loss_first_50": sum(losses[:50]) / max(1, len(losses[:50])),
        "loss_last_50": sum(losses[-50:]) / max(1, len(losses[-50:])),
    }
    write_json(folder / "pretrain_summary.json", summary)
    return summary


def load_tiny(folder: Path) -> Any:
    """The pretrained tiny Llama saved by :func:`pretrain_tiny` (float32, eval mode)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model.config.name_or_path = "mergebench-tiny-llama"
    return model.eval()

