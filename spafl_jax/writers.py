"""Metric writers behind one interface: `write_scalars(step, scalars)` and `write_hparams(hparams)`.

The JSON-lines file and the TensorBoard event file (`reporting.MetricsWriter`) are always written:
the run's own records, which resume, tables and figures read. Optional writers add other sinks,
chosen by `config.writers` (comma-separated):

- `wandb`: Weights & Biases (`pip install 'spafl_jax[wandb]'`; `WANDB_PROJECT` names the project,
  `WANDB_MODE=offline` keeps it on disk). The W&B run id is derived from the workdir, so a resumed
  run continues the same W&B run.
- `clu`: CLU's default writer (`pip install 'spafl_jax[clu]'`; its summary writer needs
  TensorFlow), writing under `<workdir>/clu`.

A writer that is asked for but not installed is a configuration error, reported before anything
is loaded or compiled.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from spafl_jax import reporting


class MetricWriter(Protocol):
    """What every writer does (the interface of CLU's `metric_writers.MetricWriter`)."""

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None: ...

    def write_hparams(self, hparams: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


class WandbWriter:
    """Weights & Biases: one W&B run per workdir, the config as its config."""

    def __init__(self, workdir: str, hparams: Mapping[str, Any] | None = None):
        import wandb  # pylint: disable=import-outside-toplevel

        absolute = os.path.abspath(workdir)
        self._wandb = wandb
        self._run = wandb.init(
            project=os.environ.get('WANDB_PROJECT', 'spafl_jax'),
            name=os.path.basename(absolute.rstrip(os.sep)),
            id=hashlib.sha256(absolute.encode()).hexdigest()[:16],
            resume='allow',
            dir=absolute,
            config=dict(hparams or {}),
        )

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        self._run.log(dict(scalars), step=step)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        self._run.config.update(dict(hparams), allow_val_change=True)

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None


class CluWriter:
    """CLU's default writer (logging and, where TensorFlow is installed, TF summaries)."""

    def __init__(self, workdir: str, hparams: Mapping[str, Any] | None = None):
        from clu import metric_writers  # pylint: disable=import-outside-toplevel

        self._writer = metric_writers.create_default_writer(
            os.path.join(workdir, 'clu'), asynchronous=False
        )
        if hparams:
            self.write_hparams(hparams)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        self._writer.write_scalars(step, dict(scalars))

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        self._writer.write_hparams(reporting.flat_hparams(hparams))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None


# Optional writers: name -> (class, module it imports, the extra that installs it).
OPTIONAL = {
    'wandb': (WandbWriter, 'wandb', 'wandb'),
    'clu': (CluWriter, 'clu', 'clu'),
}


def parse(names: str | Sequence[str]) -> list[str]:
    """`'wandb,clu'` (or a sequence) -> ['wandb', 'clu']; empty entries dropped."""
    if isinstance(names, str):
        names = names.split(',')
    return [n.strip() for n in names if n and n.strip()]


def problem(names: str | Sequence[str]) -> str | None:
    """None if every writer named is known and installed, else what is wrong and the fix."""
    for name in parse(names):
        if name not in OPTIONAL:
            return (
                f'config.writers: unknown writer {name!r}; the optional writers are '
                f'{", ".join(OPTIONAL)} (JSON lines and TensorBoard are always written).'
            )
        _, module, extra = OPTIONAL[name]
        if importlib.util.find_spec(module) is None:
            return (
                f'config.writers={name} needs the {module} package, which is not installed: '
                f"pip install 'spafl_jax[{extra}]'."
            )
    return None


class Writers:
    """Every writer of a run behind the one interface; the always-on one first."""

    def __init__(self, writers: Sequence[MetricWriter]):
        self.writers = list(writers)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        for writer in self.writers:
            writer.write_scalars(step, scalars)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        for writer in self.writers:
            writer.write_hparams(hparams)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


def create(
    workdir: str,
    names: str | Sequence[str] = (),
    *,
    resume_from_round: int | None = None,
    hparams: Mapping[str, Any] | None = None,
) -> Writers:
    """The JSON-lines and TensorBoard writer of `workdir`, then the optional writers `names`."""
    wrong = problem(names)
    if wrong:
        raise ValueError(wrong)
    writers: list[MetricWriter] = [
        reporting.MetricsWriter(workdir, resume_from_round=resume_from_round, hparams=hparams)
    ]
    for name in parse(names):
        writers.append(OPTIONAL[name][0](workdir, hparams))
    return Writers(writers)
