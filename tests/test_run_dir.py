"""A run directory has one owner (base/run_dir.py): it refuses another kind of run, what no run
made and a busy directory, names a damaged checkpoint before anything is written, starts over
replacing only the previous run's files, and a full disk during a checkpoint save is one line with
the last good checkpoint still the newest. In-process, on the training loop of tests/test_train.py."""

import errno
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from codegpt.base.errors import UserError
from codegpt.base.run_dir import RunDirectory
from tests.test_train import run_loop

ONE_PROCESS = SimpleNamespace(is_main_process=True, num_processes=1)


def tree(path: Path) -> dict:
    """Every file under `path` with its bytes, and every directory."""
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else "dir" for p in sorted(path.rglob("*"))}


def checkpoints(path: Path) -> list[str]:
    return [p.name for p in RunDirectory(path, "pretrain", ONE_PROCESS).checkpoints()]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A pretraining run of 6 steps: step-000003, step-000006 and final/."""
    run = tmp_path_factory.mktemp("finished") / "run"
    run_loop(run, max_steps=6)
    assert checkpoints(run) == ["step-000003", "step-000006"] and (run / "final").is_dir()
    return run


@pytest.fixture
def run(finished_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("name,damage", [
    ("trainer.json", truncate),
    ("trainer.json", lambda p: p.write_text(json.dumps({"step": 6, "tokens_seen": 1536}))),
    ("training_state.pt", Path.unlink),
    ("training_state.pt", truncate),
    ("model.safetensors", truncate),
    ("model.safetensors", Path.unlink),
], ids=["trainer-truncated", "trainer-no-cursor", "state-missing", "state-truncated", "weights-truncated",
        "weights-missing"])
def test_a_damaged_newest_checkpoint_is_named_before_anything_is_written(run, name, damage):
    damage(run / "step-000006" / name)
    before = tree(run)
    with pytest.raises(UserError) as refused:
        run_loop(run, max_steps=8)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{run / 'step-000006' / name}:"), message
    assert (f"remove {run / 'step-000006'} (this run leaves it alone) to resume from step-000003, which is whole, "
            "or start over with train.resume=false") in message
    assert tree(run) == before  # recipe.yaml and run.json too


def test_the_way_on_a_damage_names_works(run, capsys):
    (run / "step-000006" / "trainer.json").write_text("{")
    with pytest.raises(UserError, match="to resume from step-000003, which is whole"):
        run_loop(run, max_steps=8)
    shutil.rmtree(run / "step-000006")
    assert run_loop(run, max_steps=8)["step"] == 8
    assert f"resumed from {run / 'step-000003'} at step 3" in capsys.readouterr().out


def test_a_run_with_no_whole_checkpoint_is_told_so(run):
    truncate(run / "step-000003" / "training_state.pt")
    (run / "step-000006" / "trainer.json").write_text("{")
    before = tree(run)
    with pytest.raises(UserError, match=rf"^{run / 'step-000006' / 'trainer.json'}:1: invalid JSON: .*; the newest "
                                        "checkpoint cannot be resumed: no earlier checkpoint is whole, or start over "
                                        "with train.resume=false$"):
        run_loop(run, max_steps=8)
    assert tree(run) == before


def test_a_save_cut_between_its_renames_is_put_back_and_resumed(run, capsys):
    os.rename(run / "step-000006", run / "step-000006.old")
    last = run_loop(run, max_steps=7)
    assert last["step"] == 7 and f"resumed from {run / 'step-000006'} at step 6" in capsys.readouterr().out


def test_a_finished_run_whose_checkpoints_are_gone_is_not_trained_over(run):
    for path in ("step-000003", "step-000006"):
        shutil.rmtree(run / path)
    before = tree(run)
    with pytest.raises(UserError, match=rf"^{run}: holds a finished run \({run / 'final'}\) and no checkpoint to "
                                        "resume from; give another out_dir$"):
        run_loop(run, max_steps=8)
    assert tree(run) == before


def test_starting_over_replaces_the_previous_runs_files_and_nothing_else(run, capsys):
    (run / "notes.txt").write_text("mine\n")
    (run / "budget.json").write_text("{}\n")  # the plan of the previous run, which had a budget
    run_loop(run, max_steps=3, resume=False)
    assert f"{run}: starting over; removed the previous run's step-000003, step-000006, final, metrics.jsonl, " \
           "budget.json" in capsys.readouterr().out
    assert checkpoints(run) == ["step-000003"] and (run / "final").is_dir() and not (run / "budget.json").exists()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert steps == [1, 2, 3]
    assert (run / "notes.txt").read_text() == "mine\n"


def test_a_run_of_another_kind_or_no_run_at_all_is_refused_and_left_alone(run, tmp_path):
    before = tree(run)
    with pytest.raises(UserError) as refused:
        with RunDirectory(run, "sft", ONE_PROCESS):
            pass
    assert str(refused.value) == (f"{run}: holds a pretraining run ({run / 'run.json'}); codegpt sft writes a run "
                                  "directory of its own: give another out_dir (out_dir)")
    assert tree(run) == before
    # A fine-tuning run from before run.json named its kind: its recipe says so.
    older = tmp_path / "older-sft"
    older.mkdir()
    (older / "recipe.yaml").write_text("out_dir: older-sft\nbase: checkpoints/pretrain-cpu/final\nmethod: lora\n")
    (older / "run.json").write_text(json.dumps({"processes": 1}))
    with pytest.raises(UserError, match=rf"^{older}: holds a fine-tuning run \({older / 'recipe.yaml'}\)"):
        with RunDirectory(older, "pretrain", ONE_PROCESS):
            pass
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine\n")
    with pytest.raises(UserError, match=rf"^{mine}: not empty \(holds notes.txt\) and holds no run"):
        with RunDirectory(mine, "pretrain", ONE_PROCESS):
            pass
    assert tree(mine) == {"notes.txt": b"mine\n"}
    # What a run killed before its first write leaves is its own.
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / "run.lock").write_text("pid 1: python base/pretrain.py\n")
    with RunDirectory(killed, "pretrain", ONE_PROCESS):
        assert (killed / "run.lock").read_text().startswith(f"pid {os.getpid()}: ")


@pytest.mark.parametrize("out_dir,names", [
    ("{run}/final", "is the base model"),
    ("{run}", "holds {run}/final, the base model"),
    ("{run}/final/sft", "inside {run}/final, the base model"),
    ("{run}/recipe.yaml", "exists and is not a directory"),
    ("{run}/recipe.yaml/sft", "is a file, not a directory"),
    ("/proc/codegpt-run", "cannot write in /proc"),
])
def test_a_run_directory_in_a_place_no_run_may_write_is_refused(run, out_dir, names):
    before = tree(run)
    path = out_dir.format(run=run)
    with pytest.raises(UserError) as refused:
        with RunDirectory(path, "sft", ONE_PROCESS, inputs={"base model": run / "final"}):
            pass
    assert names.format(run=run) in str(refused.value) and "\n" not in str(refused.value)
    assert tree(run) == before


def test_a_busy_run_directory_is_refused_naming_its_process_and_free_when_it_ends(tmp_path):
    out = tmp_path / "new" / "run"
    with RunDirectory(out, "pretrain", ONE_PROCESS):
        assert (out / "run.lock").read_text().startswith(f"pid {os.getpid()}: ")
        with pytest.raises(UserError, match=rf"^{out}: in use by another run \(pid {os.getpid()}: .+\); wait for it "
                                            "to end or stop it, or give another out_dir$"):
            with RunDirectory(out, "pretrain", ONE_PROCESS):
                pass
    assert not (tmp_path / "new").exists()  # a run that wrote nothing leaves no directory behind
    with RunDirectory(out, "pretrain", ONE_PROCESS):
        pass


def _fills_the_disk_at(call: int):
    """safetensors' save_file that finds the disk full at its `call`-th call: part of the file
    lands, then the error safetensors raises (its Rust I/O error quotes the errno)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file as real

    calls = []

    def save_file(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == call:
            Path(path).write_bytes(b"\0" * 1000)
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        real(tensors, path, metadata=metadata)

    return save_file


def _fsync_fails_in(name: str):
    """os.fsync that reports a full disk for files under a temporary named after `name` (where
    delayed allocation reports it)."""
    real = os.fsync

    def fsync(fd):
        if f"/.{name}." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    return fsync


@pytest.mark.parametrize("where", ["weights", "flush", "final"])
def test_a_full_disk_during_a_checkpoint_save_is_one_line_and_the_last_good_checkpoint_stays_newest(
        tmp_path, monkeypatch, where):
    run = tmp_path / "run"  # saves step 3, step 6, step 8 and final
    if where == "flush":
        monkeypatch.setattr(os, "fsync", _fsync_fails_in("step-000006"))
    else:
        monkeypatch.setattr("codegpt.base.checkpoint.save_file", _fills_the_disk_at(2 if where == "weights" else 4))
    with pytest.raises(UserError) as refused:
        run_loop(run, max_steps=8)
    message = str(refused.value)
    failed, step, good, kept = (("final", 8, "step-000008", ["step-000006", "step-000008"]) if where == "final" else
                                ("step-000006", 6, "step-000003", ["step-000003"]))
    assert "\n" not in message and message.startswith(f"{run / failed}: no space left on the device (needs "), message
    assert message.endswith(f"; stopped at step {step}, the last good checkpoint is {run / good}"), message
    assert checkpoints(run) == kept and not (run / "final").exists()
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]  # the save's temporaries are gone
    monkeypatch.undo()  # room again: the same command resumes from the last good checkpoint
    run_loop(run, max_steps=8)  # resumed at step 8 (after final/ failed), it writes final/ alone
    assert checkpoints(run) == ["step-000006", "step-000008"] and (run / "final/model.safetensors").is_file()
