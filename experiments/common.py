"""What the experiment commands share: bare config names, recognizing a finished run, and the
pieces of their result tables."""

from __future__ import annotations

import csv
import json
import os
from typing import Any, Sequence

import ml_collections
import numpy as np

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs')
SUMMARY_FILENAME = 'summary.json'


def resolve_config_argument(argv: list[str]) -> list[str]:
    """`--config=cifar10.py[:arg]` -> experiments/configs/cifar10.py when not a path that exists."""
    out = []
    for arg in argv:
        if arg.startswith('--config=') and not arg.startswith('--config.'):
            value = arg[len('--config='):]
            path, sep, rest = value.partition(':')
            if not os.path.exists(path) and os.path.exists(os.path.join(CONFIG_DIR, path)):
                arg = '--config=' + os.path.join(CONFIG_DIR, path) + sep + rest
        out.append(arg)
    return out


def finished_summary(directory: str, config: ml_collections.ConfigDict) -> dict[str, Any] | None:
    """The summary of a finished run of exactly this config in `directory`, else None."""
    summary_path = os.path.join(directory, SUMMARY_FILENAME)
    config_path = os.path.join(directory, 'config.json')
    if not (os.path.isfile(summary_path) and os.path.isfile(config_path)):
        return None
    with open(config_path) as f:
        previous = json.load(f)
    # Through JSON, so that tuples and lists compare equal as they do on disk.
    if previous != json.loads(json.dumps(config.to_dict())):
        return None   # e.g. more rounds asked for: train_and_evaluate extends or refuses the run
    with open(summary_path) as f:
        return json.load(f)


def parse_seeds(values: Sequence[str]) -> list[int]:
    """`--seeds` as integers; a usage error naming the flag otherwise."""
    from absl import app  # pylint: disable=g-import-not-at-top
    try:
        return [int(s) for s in values]
    except ValueError:
        raise app.UsageError(f'--seeds must be integers, got {",".join(values)}') from None


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for one value); NaN if any value is NaN."""
    v = np.asarray(values, np.float64)
    return float(v.mean()), (float(v.std(ddof=1)) if len(v) > 1 else 0.0)


def percent_cell(row: dict[str, Any], field: str) -> str:
    """`row[field_mean] ± row[field_std]` as percentages with two decimals."""
    return f'{100 * row[f"{field}_mean"]:.2f} ± {100 * row[f"{field}_std"]:.2f}'


def write_csv(path: str, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """The rows' `columns`, floats at full precision (repr)."""
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction='ignore')
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})


def setting_sentence(config: ml_collections.ConfigDict) -> str:
    """The federated setting of a table, in one sentence's first half."""
    return (f'{config.num_clients} clients, {config.clients_per_round} per round, '
            f'alpha {config.alpha}, batch {config.batch_size}, {config.local_epochs} local '
            f'epoch(s), lr {config.lr}')
