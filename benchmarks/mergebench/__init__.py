"""MergeBench: label real LoRA merges and fit / evaluate the MergeProbe retention predictor.

Two parts share one pipeline (``python -m benchmarks.mergebench.run``):

- **smollm2**: one LoRA adapter per benchmark task on the embedded SmolLM2-135M-Instruct,
  each trained with :class:`~mergeprobe.callbacks.MergeProbeCallback` attached, then every
  pair (and a few triples) merged with every method and each member's retention measured.
- **tiny**: a small Llama pretrained from scratch on a mixture of the tasks, then many
  LoRA adapters (varied tasks, ranks, learning rates, lengths, seeds), merged pairwise and
  in sets, labelled the same way — the bulk of the rows the predictor is fitted on.

Stages (each cached under ``benchmarks/cache/`` and resumable): ``train`` → ``merge`` →
``fit`` → ``report``. See :mod:`benchmarks.mergebench.run`.
"""
