"""A run directory and its one owner: pretraining and SFT hand their `out_dir` to a RunDirectory.

It knows every file a run writes: `recipe.yaml` (the recipe used), `run.json` (the kind of run,
pretrain or sft, and where it ran), checkpoints `step-NNNNNN/` (weights, `training_state.pt`,
`trainer.json`) and `final/`, `budget.json`, `metrics.jsonl`, plots, `quality.json`, the
temporaries of their atomic writes, and `run.lock`. Opened, it refuses before any work:

- a place no run may write, through the shared output check (base/outputs.py): an input of the
  run (the base model, the shards, the task data), a directory holding one or inside one, a path
  under a file, an unwritable place;
- a directory holding another kind of run (a fine-tuning run never writes over pretraining
  checkpoints, nor the converse) or files no run made;
- a directory another run is using: `run.lock` is locked with flock for the run's life and names
  its process; the kernel drops the lock when that process dies, SIGKILL included.

Before a run writes anything it checks the checkpoint it would resume from, every file of it, and
names a damaged one with the way on (`check_resume`). A run that does not resume (train.resume
false, or no checkpoint yet) starts over: the previous run's files of the names above are removed,
nothing else (`start`). Under DDP only the main process checks, locks and writes, and its verdict
reaches every rank (`decided_on_main`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shlex
import shutil
import sys
from dataclasses import fields
from pathlib import Path
from typing import Callable, Mapping, TypeVar

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from safetensors import SafetensorError, safe_open

from codegpt.base import budget
from codegpt.base.errors import UserError
from codegpt.base.fileio import DiskFull, atomic_directory, atomic_write_text, read_json, recover, remove_temporaries, temporary_names
from codegpt.base.metrics import METRICS_FILE, PLOTS
from codegpt.base.outputs import check_output
from codegpt.base.provenance import provenance
from codegpt.base.recipe_loader import dump_recipe, read_yaml, to_dict

RECIPE_FILE = "recipe.yaml"
RUN_FILE = "run.json"
LOCK_FILE = "run.lock"
QUALITY_FILE = "quality.json"
FINAL_DIR = "final"
STATE_FILE = "training_state.pt"
TRAINER_FILE = "trainer.json"
TRAINER_KEYS = ("step", "tokens_seen", "data")
STEP_DIR = re.compile(r"^step-(\d+)$")
# What a run writes besides its recipe and run.json: a run that starts over replaces these.
OUTPUTS = (METRICS_FILE, budget.BUDGET_FILE, QUALITY_FILE, *PLOTS)
# The names whose atomic writes a killed run leaves as `.NAME.XXXXXXXX.tmp` in its directory.
TEMPORARIES = "|".join([r"step-\d+", FINAL_DIR, *map(re.escape, (RECIPE_FILE, RUN_FILE, *OUTPUTS))])
KINDS = {"pretrain": "pretraining", "sft": "fine-tuning"}
# Sections only a recipe of that kind has, for runs whose run.json predates its `kind`.
KIND_SECTIONS = {"sft": "base", "pretrain": "data"}

T = TypeVar("T")


def decided_on_main(accelerator: Accelerator, decide: Callable[[], T]) -> T:
    """`decide()` on the main process, and its result, or its UserError, on every rank: a check
    that reads or writes the run directory runs once, and no rank goes on when the main one stops."""
    verdict = [None, None]
    if accelerator.is_main_process:
        try:
            verdict[0] = decide()
        except UserError as err:
            verdict[1] = str(err)
    if accelerator.num_processes > 1:
        verdict = broadcast_object_list(verdict)
    if verdict[1] is not None:
        raise UserError(verdict[1])
    return verdict[0]


class RunDirectory:
    """The run directory `path` of a run of `kind` ("pretrain" or "sft"), used as a context
    manager: entering checks the place and locks it, leaving unlocks it. `inputs` (name -> path)
    are the run's inputs, which the directory may neither be, hold nor be inside;
    `weights_file` is the file of a checkpoint that holds its weights."""

    def __init__(self, path: str | os.PathLike, kind: str, accelerator: Accelerator, *,
                 inputs: Mapping[str, str | os.PathLike] | None = None, weights_file: str = "model.safetensors"):
        assert kind in KINDS, kind
        self.path = Path(path)
        self.kind = kind
        self.accelerator = accelerator
        self.inputs = dict(inputs or {})
        self.weights_file = weights_file
        self._lock_fd: int | None = None
        self._made: list[Path] = []  # directories the lock created, deepest first

    # --- the files -------------------------------------------------------------------------------

    @property
    def final(self) -> Path:
        return self.path / FINAL_DIR

    def step_dir(self, step: int) -> Path:
        return self.path / f"step-{step:06d}"

    def checkpoints(self) -> list[Path]:
        """The step checkpoints, oldest first."""
        if not self.path.is_dir():
            return []
        steps = [(int(m.group(1)), p) for p in self.path.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
        return [p for _, p in sorted(steps)]

    def prune(self, keep: int) -> None:
        """Remove all but the newest `keep` step checkpoints."""
        for old in self.checkpoints()[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    def last_good(self) -> str:
        saved = self.checkpoints()
        return f"the last good checkpoint is {saved[-1]}" if saved else "and no checkpoint was saved before"

    # --- opening: the place, the kind, the lock --------------------------------------------------

    def __enter__(self) -> RunDirectory:
        decided_on_main(self.accelerator, self._open)
        return self

    def __exit__(self, *exc) -> None:
        if self._lock_fd is None:
            return
        # Unlinked while still locked: a run that opened the old file finds it gone once it gets the lock.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path / LOCK_FILE)
        os.close(self._lock_fd)
        self._lock_fd = None
        for directory in self._made:  # a run stopped before writing anything leaves no empty directory
            try:
                directory.rmdir()
            except OSError:
                break

    def _open(self) -> None:
        check_output(self.path, command=f"codegpt {self.kind}", inputs=self.inputs, foreign=self._foreign,
                     key="out_dir")
        self._lock()

    def _foreign(self, path: Path) -> str | None:
        """What makes the existing, non-empty `path` no directory of a run of this kind, or None."""
        kind, source = recorded_kind(path)
        if kind is None:
            ours = temporary_names(TEMPORARIES)
            stray = sorted(p.name for p in path.iterdir() if p.name != LOCK_FILE and not ours.match(p.name))
            if not stray:
                return None
            return (f"not empty (holds {stray[0]}) and holds no run; a run starts in a new or empty directory, "
                    "or resumes its own")
        if kind != self.kind:
            return (f"holds a {KINDS[kind]} run ({source}); codegpt {self.kind} writes a run directory of its own: "
                    "give another out_dir")
        return None

    def _lock(self) -> None:
        made = []
        for directory in [self.path, *self.path.parents]:
            if directory.exists():
                break
            made.append(directory)
        self.path.mkdir(parents=True, exist_ok=True)
        self._made = made
        lock = self.path / LOCK_FILE
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "a process that is starting"
                os.close(fd)
                raise UserError(f"{self.path}: in use by another run ({holder}); wait for it to end or stop it, "
                                "or give another out_dir") from None
            try:  # the run before may have removed the file after this one opened it: lock the one there now
                if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        command = shlex.join(sys.orig_argv)
        if len(command) > 400:  # the program and, often last, the overrides that tell runs apart
            command = f"{command[:200]} ... {command[-200:]}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}: {command}\n".encode(), 0)
        self._lock_fd = fd

    # --- resuming or starting over ---------------------------------------------------------------

    def check_resume(self, recipe, fixed_keys: tuple[str, ...], train) -> Path | None:
        """The checkpoint a run of `recipe` resumes from (None: it starts over), checked on the
        main process before anything is written: every file of the newest checkpoint, and the
        dotted recipe keys `fixed_keys` its checkpoints depend on against the run's recipe (a key
        the run's recipe predates had the key's default). A time budget cannot be given to a
        run past its warm-up without a plan."""
        if not train.resume:
            return None
        return decided_on_main(self.accelerator, lambda: self._resume_point(recipe, fixed_keys, train))

    def _cut_short(self) -> list[Path]:
        """The `.old` copies of checkpoints whose replacement was cut between its two renames
        (see fileio.atomic_directory)."""
        return [p for p in self.path.iterdir() if p.name.endswith(".old") and p.is_dir()
                and (STEP_DIR.match(p.name[:-4]) or p.name[:-4] == FINAL_DIR)]

    def _resume_point(self, recipe, fixed_keys: tuple[str, ...], train) -> Path | None:
        for old in self._cut_short():
            recover(old.with_name(old.name[:-4]))
        checkpoints = self.checkpoints()
        if not checkpoints:
            if self.final.exists():  # starting over would replace the finished model
                raise UserError(f"{self.path}: holds a finished run ({self.final}) and no checkpoint to resume "
                                "from; give another out_dir")
            return None
        self._check_recipe(recipe, fixed_keys)
        newest = checkpoints[-1]
        if (damage := self.damage(newest)) is not None:
            whole = next((c for c in reversed(checkpoints[:-1]) if self.damage(c) is None), None)
            way_on = (f"remove {newest} (this run leaves it alone) to resume from {whole.name}, which is whole"
                      if whole else "no earlier checkpoint is whole")
            raise UserError(f"{damage}; the newest checkpoint cannot be resumed: {way_on}, or start over with "
                            "train.resume=false")
        step = json.loads((newest / TRAINER_FILE).read_text())["step"]
        if train.time_budget_minutes is not None and budget.read_plan(self.path) is None and step >= train.warmup_steps:
            raise UserError(f"train.time_budget_minutes: the run in {self.path} is at step {step}, past its "
                            f"{train.warmup_steps} warm-up steps, and has no budget plan ({budget.BUDGET_FILE}); "
                            "a budget times warm-up steps: resume without it, or give another out_dir")
        return newest

    def _check_recipe(self, recipe, keys: tuple[str, ...]) -> None:
        recipe_path = self.path / RECIPE_FILE
        if not recipe_path.is_file():
            return
        before, lines = read_yaml(recipe_path)
        now = to_dict(recipe)
        for key in keys:
            old = _dotted(before, key) if key in lines else _default(recipe, key)
            new = _dotted(now, key)
            if old != new:
                line = f":{lines[key]}" if key in lines else ""
                raise UserError(f"{recipe_path}{line}: {key} is {old} in the run, {new} now (its checkpoints are "
                                "for the run's value: keep it, or give another out_dir)")

    def damage(self, checkpoint: Path) -> str | None:
        """What makes `checkpoint` unfit to resume from, naming the file, or None when it is whole."""
        trainer = checkpoint / TRAINER_FILE
        try:
            document = read_json(trainer, f"{trainer}: missing")
        except UserError as err:
            return str(err)
        if missing := [key for key in TRAINER_KEYS if key not in document]:
            return f"{trainer}: no {missing[0]}"
        if not isinstance(document["step"], int) or document["step"] < 0:
            return f"{trainer}: step is {document['step']!r}, not a step number"
        state = checkpoint / STATE_FILE
        if not state.is_file():
            return f"{state}: missing"
        try:  # mapped, not read: a truncated or foreign file fails here all the same
            loaded = torch.load(state, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # torch.load names no narrower class for a damaged archive
            return f"{state}: not a training state ({str(err).splitlines()[0][:120]})"
        if not isinstance(loaded, dict) or "rng" not in loaded or not ({"optimizers", "optimizer"} & set(loaded)):
            return f"{state}: not a training state (no optimizer states or RNG states)"
        weights = checkpoint / self.weights_file
        if not weights.is_file():
            return f"{weights}: missing"
        try:
            with safe_open(weights, "pt") as tensors:
                tensors.keys()
        except (SafetensorError, OSError) as err:
            return f"{weights}: unreadable safetensors file ({err})"
        return None

    def read_checkpoint(self, checkpoint: Path) -> tuple[dict, dict]:
        """The trainer state (step, tokens seen, data cursor) and the training state (optimizer
        and RNG states) of a checkpoint `check_resume` found whole."""
        return (json.loads((checkpoint / TRAINER_FILE).read_text()),
                torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True))

    def write_checkpoint(self, step: int, write_weights: Callable[[Path], None], weights_bytes: int, state: dict,
                         trainer_state: dict, *, keep: int, final: bool) -> None:
        """step-NNNNNN (the weights `write_weights(directory)` writes, about `weights_bytes`; the
        training state; the trainer state), written whole or not at all, the newest `keep` kept;
        with `final` also final/ (weights only). A full disk is a UserError naming the checkpoint
        and its size, with the last good checkpoint still the newest and this save's files removed."""
        try:
            with atomic_directory(self.step_dir(step), size=weights_bytes + tensor_bytes(state)) as tmp:
                write_weights(tmp)
                # Through a Python file: a full disk is then an OSError under torch's "unexpected pos".
                with open(tmp / STATE_FILE, "wb") as f:
                    torch.save(state, f)
                (tmp / TRAINER_FILE).write_text(json.dumps(trainer_state, indent=2) + "\n")
            self.prune(keep)
            if final:
                with atomic_directory(self.final, size=weights_bytes) as tmp:
                    write_weights(tmp)
        except DiskFull as err:
            raise UserError(f"{err}; stopped at step {step}, {self.last_good()}") from None

    def start(self, recipe, resuming: bool, **run_info) -> None:
        """Write the run's recipe and run.json (its kind and `run_info`), after removing what a
        killed save left and, when the run does not resume, the previous run's files."""
        decided_on_main(self.accelerator, lambda: self._start(recipe, resuming, run_info))

    def _start(self, recipe, resuming: bool, run_info: dict) -> None:
        remove_temporaries(self.path, TEMPORARIES)
        if not resuming:
            previous = [p for p in (*self.checkpoints(), *self._cut_short(), self.final,
                                    *(self.path / name for name in OUTPUTS)) if p.exists()]
            for path in previous:
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            if previous:
                print(f"{self.path}: starting over; removed the previous run's {', '.join(p.name for p in previous)}")
        dump_recipe(recipe, self.path / RECIPE_FILE)
        atomic_write_text(self.path / RUN_FILE, json.dumps(provenance(kind=self.kind, **run_info), indent=2) + "\n")


def tensor_bytes(state) -> int:
    """The bytes of the tensors in nested dicts, lists and tuples."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(tensor_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(tensor_bytes(v) for v in state)
    return 0


def recorded_kind(path: Path) -> tuple[str | None, Path | None]:
    """The kind of run a directory holds and the file that says so: run.json's `kind`, or for a
    run made before it was recorded, the sections of its recipe.yaml. (None, None): no run."""
    run_file, recipe_file = path / RUN_FILE, path / RECIPE_FILE
    try:
        kind = json.loads(run_file.read_text()).get("kind")
        if kind in KINDS:
            return kind, run_file
    except (OSError, ValueError, AttributeError):
        pass
    if not recipe_file.is_file():
        return None, None
    try:
        sections = yaml.safe_load(recipe_file.read_text())
    except (OSError, ValueError, yaml.YAMLError):
        sections = None
    kind = next((k for k, section in KIND_SECTIONS.items() if isinstance(sections, dict) and section in sections), None)
    if kind is None:
        raise UserError(f"{recipe_file}: neither it nor {RUN_FILE} says which kind of run this directory holds; "
                        "give another out_dir")
    return kind, recipe_file


def _default(recipe, key: str):
    """The default of a dotted recipe key (`train.optimizer` -> TrainConfig's `optimizer`)."""
    *path, name = key.split(".")
    section = recipe
    for part in path:
        section = getattr(section, part)
    return next(f.default for f in fields(section) if f.name == name)


def _dotted(data: dict, key: str):
    """The value at a dotted key of nested mappings, or None where a part is missing."""
    for part in key.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data
