"""The run registry: ids from config hashes, exclusive creation, status computed from files, tolerant metrics.

Run: OMP_NUM_THREADS=1 python -m pytest tests/runs/test_registry.py -q
"""

import doctest
import json
import os
import socket
import time

import pytest

from quarl.runs import registry as R
from _fabricate import BASE_CONFIG, dead_pid, make_run


def test_doctests():
    result = doctest.testmod(R)
    assert result.attempted > 0 and result.failed == 0


def test_config_hash_ignores_seed_and_name_only():
    a = {**BASE_CONFIG, "run": {"seed": 1, "name": "x", "checkpoint_every": 4}}
    b = {**BASE_CONFIG, "run": {"seed": 7, "name": "y", "checkpoint_every": 4}}
    c = {**BASE_CONFIG, "run": {"seed": 1, "name": "x", "checkpoint_every": 5}}
    assert R.config_hash(a) == R.config_hash(b) != R.config_hash(c)
    assert a["run"]["seed"] == 1  # not mutated
    # key order is irrelevant, values are not
    assert R.config_hash({"x": 1, "y": {"b": 2, "a": 1}}) == R.config_hash({"y": {"a": 1, "b": 2}, "x": 1})
    assert R.config_hash({"x": 1}) != R.config_hash({"x": 2})
    assert len(R.config_hash(a)) == 64 and int(R.config_hash(a), 16) >= 0


def test_run_id_format_and_name_check():
    h = R.config_hash(BASE_CONFIG)[:10]
    assert R.run_id(BASE_CONFIG, 3) == f"{h}-s3"
    assert R.run_id(BASE_CONFIG, 3, "E13g") == f"E13g-{h}-s3"
    for bad in ("a b", "a/b", "", "..", "é"):
        with pytest.raises(ValueError, match=r"\[A-Za-z0-9_.-\]\+"):
            R.run_id(BASE_CONFIG, 0, bad)
    with pytest.raises(TypeError):
        R.run_id(BASE_CONFIG, "0")


def test_create_run_is_exclusive_and_records_owner(tmp_path):
    d = R.create_run(tmp_path / "a" / "b" / "r1", {"name": "r", "seed": 2, "config_hash": "abc", "extra": 1})
    info = json.loads((d / "run.json").read_text())
    assert info["id"] == "r1" and info["seed"] == 2 and info["extra"] == 1 and info["pid"] == os.getpid()
    assert info["host"] == socket.gethostname() and isinstance(info["argv"], list) and info["created_utc"]
    # before any heartbeat, run.json's owner (this live process) makes it running
    assert R.run_status(d) is R.RunStatus.RUNNING
    with pytest.raises(R.RunExistsError) as e:
        R.create_run(d, {})
    assert isinstance(e.value, FileExistsError) and e.value.status is R.RunStatus.RUNNING
    assert str(d) in str(e.value) and "running" in str(e.value)


@pytest.mark.parametrize("status,hint", [("finished", "immutable"), ("failed", "quarl train --resume"),
                                         ("killed", "quarl train --resume")])
def test_create_refuses_existing_with_status_and_hint(tmp_path, status, hint):
    d = make_run(tmp_path, status=status)
    assert R.run_status(d) is R.RunStatus(status)
    with pytest.raises(R.RunExistsError) as e:
        R.create_run(d, {})
    assert e.value.status is R.RunStatus(status) and f"status: {status}" in str(e.value) and hint in str(e.value)
    if status != "finished":
        assert f"--resume {d}" in str(e.value)


def test_create_refuses_foreign_directory(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(R.RunExistsError, match="not a quarl run"):
        R.create_run(tmp_path / "x", {})


def test_status_from_heartbeat_pid_and_age(tmp_path):
    d = R.create_run(tmp_path / "r", {})
    R.heartbeat(d, 3, 10)
    hb = json.loads((d / "heartbeat.json").read_text())
    assert hb["pid"] == os.getpid() and hb["step"] == 3 and hb["total_steps"] == 10 and hb["unix"] > 0
    assert R.run_status(d) is R.RunStatus.RUNNING
    # the owner died on this host -> killed, however fresh the heartbeat
    (d / "heartbeat.json").write_text(json.dumps({**hb, "pid": dead_pid()}))
    assert R.run_status(d) is R.RunStatus.KILLED
    # a recycled pid (alive, but a different process start time) -> killed
    (d / "heartbeat.json").write_text(json.dumps({**hb, "pid_start": (hb["pid_start"] or 0) + 12345}))
    if hb["pid_start"] is not None:
        assert R.run_status(d) is R.RunStatus.KILLED
    # another host: the heartbeat's age decides
    other = {**hb, "host": hb["host"] + "-elsewhere", "pid": 1}
    (d / "heartbeat.json").write_text(json.dumps({**other, "unix": time.time() - 5}))
    assert R.run_status(d, stale_after_s=600) is R.RunStatus.RUNNING
    (d / "heartbeat.json").write_text(json.dumps({**other, "unix": time.time() - 601}))
    assert R.run_status(d, stale_after_s=600) is R.RunStatus.KILLED
    with pytest.raises(R.RunExistsError, match="running elsewhere.*quarl train --resume"):
        (d / "heartbeat.json").write_text(json.dumps({**other, "unix": time.time()}))
        R.create_run(d, {})


def test_exit_record_wins_and_resume_cycle(tmp_path):
    d = R.create_run(tmp_path / "r", {})
    R.heartbeat(d, 1)
    R.mark_exit(d, "failed", 1, error="RuntimeError: nan loss")
    assert R.run_status(d) is R.RunStatus.FAILED  # even though this process is alive
    assert json.loads((d / "exit.json").read_text())["error"].startswith("RuntimeError")
    R.clear_exit(d)
    R.heartbeat(d, 2)
    assert R.run_status(d) is R.RunStatus.RUNNING
    R.mark_exit(d, R.RunStatus.FINISHED, 2)
    assert R.run_status(d) is R.RunStatus.FINISHED
    with pytest.raises(R.RunFinishedError):
        R.clear_exit(d)
    with pytest.raises(R.RunFinishedError):
        R.heartbeat(d, 3)
    with pytest.raises(ValueError):
        R.mark_exit(d, "running", 3)
    with pytest.raises(ValueError):
        R.mark_exit(d, "finished", 3, error="x")
    assert not list(d.glob(".*.tmp"))  # atomic writes leave no temp files


def test_read_metrics_tolerates_sigkill_and_resume(tmp_path):
    d = R.create_run(tmp_path / "r", {})
    for s in range(4):
        R.append_metrics(d, {"step": s, "loss": float(s)})
    with open(d / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 4.0, "rew')  # SIGKILL mid-write
    rows = R.read_metrics(d)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    # resume from checkpoint-2 re-logs steps 3.. ; the re-logged rows win and the cut line is terminated first
    for s in (3, 4, 5):
        R.append_metrics(d, {"step": s, "loss": 10.0 + s})
    rows = R.read_metrics(d)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5]
    assert [r["loss"] for r in rows] == [0.0, 1.0, 2.0, 13.0, 14.0, 15.0]
    # a cut line directly continued by another writer: the complete object at its end survives
    with open(d / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo{"step": 6, "loss": 16.0}\n')
    assert R.read_metrics(d)[-1] == {"step": 6, "loss": 16.0}
    assert R.read_metrics(tmp_path / "missing") == []


def test_read_run_and_list_runs(tmp_path):
    a = make_run(tmp_path, seed=0, name="E13a", val={0: 0.25, 4: 0.3, 8: 0.5}, status="finished")
    b = make_run(tmp_path / "nested", seed=1, status="killed", steps=6)
    (tmp_path / "demo" / "20250101").mkdir(parents=True)  # not a run: ignored
    runs = R.list_runs(tmp_path)
    assert [r.path for r in runs] == [a, b]
    ra, rb = runs
    assert ra.id == a.name and ra.name == "E13a" and ra.seed == 0 and ra.status is R.RunStatus.FINISHED
    assert ra.step == 8 and ra.total_steps == 8 and ra.val_acc_first == 0.25 and ra.val_acc_last == 0.5
    assert ra.wall_s is not None and ra.wall_s >= 0
    assert rb.status is R.RunStatus.KILLED and rb.step == 6 and rb.name is None
    assert R.read_run(a) == ra
    with pytest.raises(FileNotFoundError):
        R.read_run(tmp_path / "demo")
    assert R.list_runs(tmp_path / "nothing-here") == []


def test_identical_config_and_seed_under_another_name_is_refused(tmp_path):
    a = make_run(tmp_path, seed=0, name="first", status="killed")
    h = R.config_hash({**BASE_CONFIG, "run": {"seed": 0, "name": "second", "checkpoint_every": 4}})
    with pytest.raises(R.RunExistsError, match="under another name") as e:
        R.create_run(tmp_path / "second-x", {"name": "second", "seed": 0, "config_hash": h})
    assert e.value.path == a and e.value.status is R.RunStatus.KILLED
    R.create_run(tmp_path / "other-seed", {"name": "second", "seed": 1, "config_hash": h})  # another seed is fine
