"""Scale-out through accelerate: two CPU processes (gloo DDP) run `quarl train`; rank 0 alone writes the run.

``accelerate launch --cpu --num_processes 2`` starts ONE process: accelerate's simple launcher spawns several
processes only with an MPI hostfile. Two CPU ranks come from the multi-GPU launcher on a host without CUDA, with
``use_cpu=True`` (quarl sets it when CUDA is absent): that is what this test runs. On GPUs the same command is plain
multi-GPU data parallelism.
"""

import json
import os
import shutil
import subprocess

import pytest

from quarl.runs import read_metrics, run_status

CONFIG = """
injection: {scheme: MXFP4}
grpo: {steps: 2, prompts_per_step: 4, generations: 2, max_new_tokens: 32, distill: 1.0, beta: 0.1,
       reference: unquantized}
data: {train_n: 64}
eval: {every: 10, n: 8, batch_size: 8}
run: {checkpoint_every: 1}
"""


@pytest.mark.slow
def test_accelerate_two_cpu_processes(tmp_path):
    if shutil.which("accelerate") is None:
        pytest.skip("accelerate CLI not on PATH")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(CONFIG)
    out = tmp_path / "run"
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "quarl", "train", str(cfg), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert run_status(out).value == "finished"
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2]  # one row per step: only rank 0 writes
    assert all(r["distill/kl"] > 0 and r["kl"] > 0 for r in rows[1:])  # both ranks' unquantized forwards, gathered
    assert (out / "train.log").exists() and (out / "train.rank1.log").exists()
    ckpt = out / "checkpoints" / "checkpoint-2"
    assert (ckpt / "rng_state_0.pth").exists() and (ckpt / "rng_state_1.pth").exists()  # both ranks' RNG saved
    assert (ckpt / "quarl_complete").exists()
    assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == 2
