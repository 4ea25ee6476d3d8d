"""quarl.eval: GSM8K scoring exactly as verl does, metrics with confidence intervals, and the evaluation harness.

- ``gsm8k``    pure scorers: ``extract_answer``, ``compute_score`` (verl), ``is_correct``, ``score``, the TRL-signature
               ``gsm8k_reward``; :class:`~quarl.eval.gsm8k.Scorer` STRICT (default) / FLEXIBLE / NUMERIC (not verl).
- ``metrics``  mean@k, maj@k, best@k (= pass@k), Wilson / bootstrap 95% CIs, verl's ``process_validation_metrics``
               and ``val-core/{data_source}/acc/mean@1`` naming.
- ``results``  per-sample records, the metric summary, ``samples.jsonl`` + ``summary.json``.
- ``harness``  batched KV-cache generation and ``run_eval`` (optionally under a ``quarl.inject`` spec).

Submodules are imported on use.
"""
