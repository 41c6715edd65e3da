"""Training metrics: `metrics.jsonl` in the run directory, wandb when enabled, PNG plots.

Only the main process writes. A resumed run first drops the lines logged after its checkpoint,
so the file reads as if the run had never stopped. A full disk is a UserError naming the file.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import math
import os
from pathlib import Path

from codegpt.base.errors import UserError
from codegpt.base.fileio import atomic_write_bytes, atomic_write_text

METRICS_FILE = "metrics.jsonl"
PLOTS = ("loss.png", "perplexity.png", "lr.png", "throughput.png")


class MetricsLog:
    def __init__(self, out_dir: Path, enabled: bool = True):
        self.path = Path(out_dir) / METRICS_FILE
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.wandb_run = None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record) + "\n"
        try:
            with open(self.path, "a") as f:
                f.write(line)
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise UserError(f"{self.path}: no space left on the device for {len(line)} more bytes of metrics "
                            f"({err.strerror}); stopped at step {record['step']}") from None
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=record["step"])

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        kept = [r for r in self.records() if r["step"] <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def start_wandb(self, log_config, recipe, resume: bool) -> None:
        """wandb in the recipe's mode. `offline` and `disabled` never touch the network or ask for a key."""
        if not self.enabled or log_config.wandb == "disabled":
            return
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        self.wandb_run = wandb.init(
            project=log_config.wandb_project, name=log_config.run_name or self.out_dir.name,
            dir=str(self.out_dir), mode=log_config.wandb, config=dataclasses.asdict(recipe),
            resume="allow" if resume else None, id=_wandb_id(self.out_dir),
        )

    def finish(self) -> None:
        if self.enabled:
            self.plot()
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None

    def plot(self) -> None:
        """PLOTS in the run directory, each written atomically."""
        if not self.enabled:
            return
        records = self.records()
        train = [r for r in records if "loss" in r]
        val = [r for r in records if "val_loss" in r]
        if not train:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        def figure(name, title, ylabel, series, log_y=False):
            fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
            for label, rows, key, style in series:
                if rows:
                    ax.plot([r["step"] for r in rows], [r[key] for r in rows], style, label=label)
            ax.set(title=title, xlabel="step", ylabel=ylabel)
            if log_y:
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
            if len(series) > 1:
                ax.legend()
            fig.tight_layout()
            image = io.BytesIO()
            fig.savefig(image, format="png")
            plt.close(fig)
            atomic_write_bytes(self.out_dir / name, image.getvalue())

        for r in train:
            r["ppl"] = math.exp(min(r["loss"], 50.0))
        loss, perplexity, lr, throughput = PLOTS
        figure(loss, "Loss", "cross-entropy (nats/token)",
               [("train", train, "loss", "-"), ("validation", val, "val_loss", "o-")])
        figure(perplexity, "Perplexity", "perplexity",
               [("train", train, "ppl", "-"), ("validation", val, "val_ppl", "o-")], log_y=True)
        figure(lr, "Learning rate", "lr", [("lr", train, "lr", "-")])
        figure(throughput, "Throughput", "tokens/s", [("tokens/s", train, "tokens_per_s", "-")])


def _wandb_id(out_dir: Path) -> str:
    """A stable run id per run directory, so a resumed run continues the same wandb run."""
    import hashlib

    return hashlib.sha1(str(Path(out_dir).resolve()).encode()).hexdigest()[:12]
