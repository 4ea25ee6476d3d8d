"""Checkpoints a killed run can resume from: quarl's state next to TRL's, and a marker written last.

TRL's checkpoint (adapters, optimizer, scheduler, RNG states, trainer state) is extended with ``quarl_state.json``
(the step, the AQN state, how many prompts were consumed) and, once every rank has finished writing, an empty
``quarl_complete`` marker. A process killed mid-save leaves a directory without the marker, which `last_checkpoint`
skips (looking for the newest ``checkpoint-N`` alone would pick the half-written one). On resume, the AQN's count of
applications is restored from ``quarl_state.json`` (its noise is a pure function of (seed, step), so nothing else
is needed).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)
COMPLETE_MARKER = "quarl_complete"
STATE_FILE = "quarl_state.json"


def save_quarl_state(trainer: Any, folder: str, aqn: Any) -> None:
    """Write ``quarl_state.json`` (main process), wait for every rank's files, then the completion marker."""
    step = trainer.state.global_step
    if trainer.args.should_save:
        state = {"global_step": step,
                 "aqn": None if aqn is None else {"step": step, "applications": aqn.applications,
                                                  "sigma": aqn.sigma(step)},
                 "prompts_consumed": step * trainer.args.generation_batch_size // trainer.num_generations}
        with open(os.path.join(folder, STATE_FILE), "w") as f:
            json.dump(state, f)
    trainer.accelerator.wait_for_everyone()  # every rank's rng_state_{rank}.pth is on disk
    if trainer.args.should_save:
        with open(os.path.join(folder, COMPLETE_MARKER), "w") as f:
            f.write("ok\n")


def restore_aqn(checkpoint: str, aqn: Any) -> None:
    """Set ``aqn.applications`` from the checkpoint's ``quarl_state.json``; a missing file is an error."""
    path = os.path.join(checkpoint, STATE_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: {checkpoint} was not written by quarl, so the AQN state of the "
                                "run cannot be restored")
    with open(path) as f:
        aqn.applications = (json.load(f).get("aqn") or {}).get("applications", 0)
    logger.info("resume: AQN restored from %s (%d applications)", checkpoint, aqn.applications)


def last_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint that quarl marked complete (a half-written one after SIGKILL is skipped)."""
    done = [p for p in (Path(run_dir) / "checkpoints").glob("checkpoint-*") if (p / COMPLETE_MARKER).exists()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)
