"""quarl.data: GSM8K-format problems from every source, as one record type.

- ``records``       :class:`~quarl.data.records.Problem` (question, answer ending in ``#### N``, ground_truth, ...).
- ``gsm8k``         loaders for HF ``openai/gsm8k``, verl preprocessed parquet (read and write), JSONL; verl's
                    prompt instruction and ground-truth extraction; shipped sample files (``sample_path``).
- ``reasoning_gym`` reasoning-gym ``gsm_symbolic`` problems, seeded, with hash-disjoint train/test splits.
- ``synthetic``     quarl's own multi-step arithmetic word problems (the testbed's task).
- ``sources``       ``load_source("synthetic" | "gsm_symbolic" | "gsm8k" | path | hub id, n)`` for the CLI; an
                    unloadable name is a ValueError listing the accepted forms (no hub traceback).

Submodules are imported on use (``datasets``, ``pyarrow`` and ``reasoning_gym`` are optional dependencies).
"""
