"""What the experiment commands share: bare config names, and recognizing a run that is finished."""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections

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
