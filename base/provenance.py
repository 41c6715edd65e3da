"""Where a model came from, and which weights an adapter was trained on.

`provenance()` goes into every checkpoint and run directory: time, the code's git commit, library
versions. `weights_hash()` identifies a base model's weights, so that an adapter refuses any other.
"""

from __future__ import annotations

import datetime
import hashlib
import subprocess
import sys
from pathlib import Path

import torch

TIED_KEY = "lm_head.weight"


def provenance(**extra) -> dict:
    """Where a model came from: time, git commit, library versions, plus `extra`."""
    info = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": code_commit(), "versions": library_versions()}
    info.update(extra)
    return info


def code_commit() -> str | None:
    """The commit of the repository that holds this code, or None when no repository tracks it:
    a copy of the code inside another project's working tree records nothing rather than that
    project's commit."""
    here = Path(__file__).resolve()
    try:
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", here.name], cwd=here.parent,
                                 capture_output=True, timeout=5).returncode == 0
        if not tracked:
            return None
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here.parent, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": sys.version.split()[0]}
    for package in ("torch", "tiktoken", "accelerate", "datasets", "safetensors"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return versions


def weights_hash(state: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of a state dict (order independent).
    Adapters record it to refuse a base they were not trained on."""
    digest = hashlib.sha256()
    for key in sorted(state):
        if key == TIED_KEY:
            continue
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()
