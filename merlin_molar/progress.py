"""Progress that reads well in a terminal and in a log file.

On a terminal, bars update in place. When the output is a file or a CI log, a bar prints a line only at
every tenth of its total, and the Trainer's per-step bars and per-log dictionaries are replaced by
:class:`SparseProgressCallback`, so a long run leaves a few dozen lines instead of thousands.
"""
from __future__ import annotations

import sys

from transformers import TrainerCallback

LINES_PER_RUN = 10


def interactive() -> bool:
    """True when progress goes to a terminal (tqdm and the Trainer write to stderr)."""
    return sys.stderr.isatty()


class _Lines:
    """tqdm's output for a log file: each update on a line of its own (tqdm writes carriage-return updates,
    which a log file shows as one endless line), the same line never twice."""

    def __init__(self, stream):
        self.stream = stream
        self.last = None

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip("\n")
        if line.strip() and line != self.last:
            self.stream.write(line + "\n")
            self.last = line

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(total=None, **kwargs):
    """A tqdm bar: in place on a terminal, a line per tenth of ``total`` otherwise."""
    from tqdm.auto import tqdm

    if not interactive():
        kwargs.setdefault("mininterval", 0)
        kwargs.setdefault("miniters", max(1, (total or 0) // LINES_PER_RUN))
        kwargs.setdefault("ascii", True)
        kwargs["file"] = _Lines(kwargs.get("file") or sys.stderr)
    return tqdm(total=total, **kwargs)


class SparseProgressCallback(TrainerCallback):
    """Trainer progress for log files: a line at every tenth of the planned steps (loss, latest validation
    NDCG@10) and a line when early stopping ends the run."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.loss = self.ndcg = None
        self.next_report = 0

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def on_train_begin(self, args, state, control, **kwargs):
        self.every = max(1, state.max_steps // LINES_PER_RUN)
        self.next_report = self.every
        self._print(f"training: up to {state.max_steps} steps ({args.num_train_epochs:g} epochs)")

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        self.loss = logs.get("loss", self.loss)
        self.ndcg = next((v for k, v in logs.items() if k.endswith("ndcg_at_10") and k.startswith("eval")), self.ndcg)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.next_report:
            self.next_report += self.every
            parts = [f"step {state.global_step}/{state.max_steps}", f"epoch {state.epoch:.1f}"]
            if self.loss is not None:
                parts.append(f"loss {self.loss:.4f}")
            if self.ndcg is not None:
                parts.append(f"valid NDCG@10 {self.ndcg:.4f}")
            self._print("  " + ", ".join(parts))

    def on_train_end(self, args, state, control, **kwargs):
        stopped = state.global_step < state.max_steps
        best = f", best validation NDCG@10 {state.best_metric:.4f}" if state.best_metric is not None else ""
        self._print(f"training: {'early-stopped at' if stopped else 'finished'} step {state.global_step} "
                    f"(epoch {state.epoch:.1f}){best}")
