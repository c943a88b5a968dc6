"""The records a run leaves while it trains: ``log.csv``, TensorBoard events and the console.

One :class:`RunLog` per run: :meth:`RunLog.epoch` rewrites ``log.csv`` atomically from the whole log
(so an interrupted run never leaves a half-written file), adds the epoch's scalars to TensorBoard and
prints one line; :meth:`RunLog.iteration` adds per-iteration scalars; :meth:`RunLog.bar` is the
progress bar of one epoch.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from theory.atomic import atomic_write

LOG_CSV = "log.csv"
#: Cross-process parameter digests of a data-parallel run (``train.sync_check_every``), one line per check.
SYNC_CSV = "sync_check.csv"
#: Log columns that measure time; everything else must agree between a resumed and an uninterrupted run.
TIME_FIELDS = ("epoch_time_s", "wall_time_s")


class RunLog:
    """CSV + optional TensorBoard + console output of one run in ``out``.

    ``purge_step``: on resume, TensorBoard events after this step (written by the interrupted run
    after its last checkpoint) are dropped.  ``writer=False`` (every process but rank 0 of a
    data-parallel run): nothing is written or printed.
    """

    def __init__(self, out: Path, *, tensorboard: bool, progress: bool, purge_step: int | None = None,
                 writer: bool = True) -> None:
        self.out = Path(out)
        self.writer = writer
        self.tensorboard = tensorboard and writer
        self.progress = progress and writer
        self.purge_step = purge_step or None
        self._writer: Any = None

    def _tb(self) -> Any:
        if self._writer is None and self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.out / "tensorboard"), purge_step=self.purge_step)
        return self._writer

    def bar(self, total: int, desc: str) -> Any:
        """A tqdm bar for one epoch (``None`` without ``progress``)."""
        if not self.progress:
            return None
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    def iteration(self, step: int, scalars: dict[str, float]) -> None:
        """Per-iteration scalars (TensorBoard ``iter/...``)."""
        writer = self._tb()
        if writer is not None:
            for k, v in scalars.items():
                writer.add_scalar(f"iter/{k}", v, step)

    def epoch(self, rows: list[dict[str, Any]], epoch: int) -> None:
        """The log after epoch ``epoch``: ``log.csv`` (all ``rows``), TensorBoard ``epoch/...``, one console line."""
        if not self.writer:
            return
        write_csv(self.out / LOG_CSV, rows)
        rec = rows[-1]
        writer = self._tb()
        if writer is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
                    writer.add_scalar(f"epoch/{k}", v, epoch)
            writer.flush()
        if self.progress:
            echo(rec)

    def sync_check(self, step: int, where: str, digests: list[str]) -> None:
        """One line of ``sync_check.csv``: the step, what preceded the check, every process's parameter digest.

        A diagnostic trail, appended line by line (the trainer has already stopped the run if the
        digests differ).
        """
        if not self.writer:
            return
        path = self.out / SYNC_CSV
        header = "" if path.exists() else "step,where,ranks,agree," + ",".join(
            f"sha256_rank{r}" for r in range(len(digests))) + "\n"
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(f"{header}{step},{where},{len(digests)},{int(len(set(digests)) == 1)},{','.join(digests)}\n")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """``rows`` as CSV (columns in order of first appearance; ``None`` as empty), atomically."""
    if not rows:
        return
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]

    def write(fh: Any) -> None:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})

    atomic_write(path, write)


def echo(rec: dict[str, Any]) -> None:
    """One console line per epoch (through tqdm, so that it does not break a progress bar)."""
    from tqdm import tqdm

    tqdm.write(
        f"epoch {rec['epoch']:>3}  loss {rec['train_loss']:.4f}  test {rec['test_acc'] * 100:5.2f}%  "
        f"layers {rec['layers']}  blocks {rec['blocks_alive']}  units {rec['units']}  "
        f"fPR {rec['fPR'] * 100:5.1f}%  pPR {rec['pPR'] * 100:5.1f}%  cost {rec['train_cost_ratio']:.3f}  "
        f"θ<½ {rec['theta_frac_lt_half']:.2f}  {rec['epoch_time_s']:.1f}s"
    )


__all__ = ["LOG_CSV", "SYNC_CSV", "TIME_FIELDS", "RunLog", "echo", "write_csv"]
