"""Metrics logging of a SpaFL run: the kill-safe `metrics.jsonl` and its TensorBoard event file
(`MetricsWriter`, `read_metrics`), and atomic JSON files; the figures are in `figures`.

Pure Python/numpy on purpose: it runs on the host between rounds and in
notebooks that only have the `metrics.jsonl` of a finished run.
"""

from __future__ import annotations

import json
import numbers
import os
import struct
import time
from typing import Any
from collections.abc import Mapping, Sequence

from absl import logging
import numpy as np

from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
from tensorboard.plugins.hparams import api_pb2 as hparams_api_pb2
from tensorboard.plugins.hparams import metadata as hparams_metadata
from tensorboard.plugins.hparams import plugin_data_pb2 as hparams_data_pb2

from spafl_jax import files

# The figures moved to `figures`; `reporting.plot_metrics` etc. still resolve.
from spafl_jax.figures import plot_metrics, plot_sparsity_pattern, save_figure  # noqa: F401

METRICS_FILENAME = 'metrics.jsonl'
TENSORBOARD_DIRNAME = 'tensorboard'
# One event file, rebuilt from metrics.jsonl whenever it does not hold exactly its records.
EVENTS_FILENAME = 'events.out.tfevents.spafl_jax'


def _to_python_scalar(key: str, value: Any) -> Any:
    """Converts numpy/array scalars to plain Python so json.dumps accepts them."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    # 0-d numpy (or device) arrays: anything with an empty shape and .item().
    if getattr(value, 'shape', None) == () and hasattr(value, 'item'):
        return _to_python_scalar(key, value.item())
    raise TypeError(
        f'Metric {key!r} must be a scalar number, got {type(value).__name__} '
        f'with shape {getattr(value, "shape", None)}.'
    )


def _is_tensorboard_scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _parse_records(text: str) -> tuple[list[dict], list[str]]:
    """The records of a metrics.jsonl text, and a note per line that is not one.

    A record is a JSON object with an integer 'round', rounds strictly
    increasing. A last line without its newline is kept if it is a whole
    record (only the newline was lost) and otherwise is the fragment a killed
    writer left. Garbage lines, and records whose round does not follow the
    previous one, are left out and named in the notes.
    """
    records, notes = [], []
    lines = text.split('\n')
    for number, line in enumerate(lines, start=1):
        last = number == len(lines)
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not (
            isinstance(record, dict)
            and isinstance(record.get('round'), int)
            and not isinstance(record.get('round'), bool)
        ):
            notes.append(
                f'line {number}: '
                + ('an unfinished last record' if last else 'not a metrics record')
                + f' ({line[:40]!r})'
            )
            continue
        if records and record['round'] <= records[-1]['round']:
            notes.append(
                f'line {number}: round {record["round"]} does not follow '
                f'round {records[-1]["round"]}'
            )
            continue
        records.append(record)
    return records, notes


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl file (`_parse_records`: a torn last line
    or a garbage line is left out)."""
    with open(path, encoding='utf-8', errors='replace') as f:
        return _parse_records(f.read())[0]


def json_ready(obj: Any) -> Any:
    """`obj` as it reads back from a JSON file (tuples become lists, keys strings)."""
    return json.loads(json.dumps(obj))


def write_json_atomic(path: str, obj: Any) -> None:
    """Writes `obj` as JSON so readers see either the old or the new file."""
    files.write_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + '\n')


def _tfrecord(data: bytes) -> bytes:
    """One TFRecord: length, its masked CRC, the data, its masked CRC (little-endian)."""
    header = struct.pack('<Q', len(data))
    return (
        header
        + struct.pack('<I', masked_crc32c(header))
        + data
        + struct.pack('<I', masked_crc32c(data))
    )


def _read_tfrecords(blob: bytes) -> list[tuple[int, bytes]]:
    """(end offset, data) of each whole, checksummed record, up to the first torn or bad one."""
    out, offset = [], 0
    while offset + 12 <= len(blob):
        header = blob[offset : offset + 8]
        (length,) = struct.unpack('<Q', header)
        (header_crc,) = struct.unpack('<I', blob[offset + 8 : offset + 12])
        end = offset + 12 + length + 4
        if header_crc != masked_crc32c(header) or end > len(blob):
            break
        data = blob[offset + 12 : offset + 12 + length]
        if struct.unpack('<I', blob[end - 4 : end])[0] != masked_crc32c(data):
            break
        out.append((end, data))
        offset = end
    return out


def _version_event(wall_time: float) -> event_pb2.Event:
    return event_pb2.Event(wall_time=wall_time, file_version='brain.Event:2')


def _scalar_event(record: Mapping[str, Any], wall_time: float) -> event_pb2.Event:
    values = [
        summary_pb2.Summary.Value(tag=key, simple_value=float(value))
        for key, value in sorted(record.items())
        if key != 'round' and _is_tensorboard_scalar(value)
    ]
    return event_pb2.Event(
        wall_time=wall_time, step=record['round'], summary=summary_pb2.Summary(value=values)
    )


def flat_hparams(hparams: Mapping[str, Any], prefix: str = '') -> dict[str, bool | float | str]:
    """A config as TensorBoard's hparams take it: nested keys joined by '.', numbers as floats,
    booleans and strings as they are, anything else (tuples, None) as its text."""
    flat = {}
    for key, value in sorted(hparams.items()):
        name = f'{prefix}{key}'
        if isinstance(value, Mapping):
            flat.update(flat_hparams(value, f'{name}.'))
        elif isinstance(value, (bool, str)):
            flat[name] = value
        elif isinstance(value, numbers.Real):
            flat[name] = float(value)
        else:
            flat[name] = str(value)
    return flat


# The metrics the hparams dashboard offers as columns next to a run's hyperparameters.
HPARAMS_METRICS = (
    'accuracy',
    'accuracy_weighted',
    'density',
    'density_weighted',
    'bits_up',
    'bits_down',
    'train_loss',
)


def _hparams_events(hparams: Mapping[str, Any], wall_time: float) -> list[event_pb2.Event]:
    """TensorBoard's hparams plugin records (experiment, then session start) for `hparams`,
    written without TensorFlow: the plugin's own protos in summaries over its null tensor."""
    flat = flat_hparams(hparams)
    kinds = {
        bool: hparams_api_pb2.DATA_TYPE_BOOL,
        float: hparams_api_pb2.DATA_TYPE_FLOAT64,
        str: hparams_api_pb2.DATA_TYPE_STRING,
    }
    experiment = hparams_api_pb2.Experiment(
        hparam_infos=[
            hparams_api_pb2.HParamInfo(name=k, type=kinds[type(v)]) for k, v in flat.items()
        ],
        metric_infos=[
            hparams_api_pb2.MetricInfo(name=hparams_api_pb2.MetricName(tag=t))
            for t in HPARAMS_METRICS
        ],
    )
    start = hparams_data_pb2.SessionStartInfo()
    for key, value in flat.items():
        if isinstance(value, bool):
            start.hparams[key].bool_value = value
        elif isinstance(value, float):
            start.hparams[key].number_value = value
        else:
            start.hparams[key].string_value = value
    events = []
    for tag, data in (
        (
            hparams_metadata.EXPERIMENT_TAG,
            hparams_data_pb2.HParamsPluginData(experiment=experiment),
        ),
        (
            hparams_metadata.SESSION_START_INFO_TAG,
            hparams_data_pb2.HParamsPluginData(session_start_info=start),
        ),
    ):
        value = summary_pb2.Summary.Value(
            tag=tag,
            metadata=hparams_metadata.create_summary_metadata(data),
            tensor=hparams_metadata.NULL_TENSOR,
        )
        events.append(
            event_pb2.Event(wall_time=wall_time, summary=summary_pb2.Summary(value=[value]))
        )
    return events


def _same_content(a: event_pb2.Event, b: event_pb2.Event) -> bool:
    """Equal but for the wall time (which a rebuilt event cannot know)."""
    a, b = (
        event_pb2.Event.FromString(a.SerializeToString()),
        event_pb2.Event.FromString(b.SerializeToString()),
    )
    a.wall_time = b.wall_time = 0.0
    return a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)


def _open_event_log(
    directory: str,
    records: Sequence[Mapping[str, Any]],
    hparams: Mapping[str, Any] | None = None,
) -> str:
    """Makes `directory`/EVENTS_FILENAME hold exactly a version event, the hparams events (when
    given) and one scalar event per record, and returns its path.

    TensorBoard reads every event file of a directory, so a file that is not rebuilt from the
    metrics could show rounds a killed run wrote and a resumed run recomputed. The file is kept as
    it is when it already holds exactly these events (wall times aside), cut when it only holds
    more of them (rounds about to be recomputed, or a torn last event), and otherwise written
    again; other event files (those of older versions of this writer) are removed once it is
    durable.
    """
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, EVENTS_FILENAME)
    now = time.time()
    expected = [_version_event(now)]
    expected += _hparams_events(hparams, now) if hparams else []
    expected += [_scalar_event(r, now) for r in records]
    existing = files.read_bytes(path) or b''
    found = _read_tfrecords(existing)
    matched = 0
    for (_, data), event in zip(found, expected):
        try:
            if not _same_content(event_pb2.Event.FromString(data), event):
                break
        except Exception:  # pylint: disable=broad-except  (not an event at all)
            break
        matched += 1
    if matched == len(expected):
        end = found[matched - 1][0]
        if end < len(existing):
            os.truncate(path, end)
    else:
        kept = [event_pb2.Event.FromString(data) for _, data in found[:matched]]
        files.write_atomic(
            path, b''.join(_tfrecord(e.SerializeToString()) for e in kept + expected[matched:])
        )
    for name in os.listdir(directory):
        if 'tfevents' in name and name != EVENTS_FILENAME:
            os.remove(os.path.join(directory, name))
    return path


class MetricsWriter:
    """Writes one JSON object per evaluated round to workdir/metrics.jsonl and
    its numbers to the TensorBoard event file workdir/tensorboard/EVENTS_FILENAME,
    with the run's hyperparameters for TensorBoard's hparams dashboard. The
    always-on writer of `spafl_jax.writers` (`write_scalars`, `write_hparams`).

    Safe across kills and restarts: each record is a single O_APPEND write
    followed by fsync, a partial last line left by a killed process is cut on
    open, and `resume_from_round` drops the records a restarted run is about to
    recompute, so no round is ever held twice. Rounds must strictly increase.
    The event file is derived from metrics.jsonl and never trusted: on open it
    is made to hold exactly the records kept (`_open_event_log`).
    """

    def __init__(
        self,
        workdir: str,
        resume_from_round: int | None = None,
        hparams: Mapping[str, Any] | None = None,
    ):
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, METRICS_FILENAME)
        self.tensorboard_dir = os.path.join(workdir, TENSORBOARD_DIRNAME)
        records = self._repair(resume_from_round)
        self._last_round = records[-1]['round'] if records else None
        self._hparams = dict(hparams) if hparams else None
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._tb_fd = os.open(
            _open_event_log(self.tensorboard_dir, records, self._hparams),
            os.O_WRONLY | os.O_APPEND,
        )

    def _repair(self, resume_from_round: int | None) -> list[dict]:
        """Cuts a partial last line, garbage lines and rounds >= resume_from_round.

        Returns:
          The records still in the file.
        """
        if not os.path.exists(self.path):
            return []
        with open(self.path, 'rb') as f:
            data = f.read()
        text = data.decode('utf-8', errors='replace')
        records, notes = _parse_records(text)
        for note in notes:
            logging.warning('%s, %s: left out', self.path, note)
        if resume_from_round is not None:
            records = [r for r in records if r['round'] < resume_from_round]
        repaired = ''.join(json.dumps(r, sort_keys=True) + '\n' for r in records)
        if repaired != text:
            if not notes and text.startswith(repaired):
                # Only whole records at the end go (rounds to recompute): cut in place.
                os.truncate(self.path, len(repaired.encode('utf-8')))
            else:
                files.write_atomic(self.path, repaired)
        return records

    def write(self, record: Mapping[str, Any]) -> None:
        """Appends one round's metrics; every number also goes to TensorBoard."""
        if self._fd is None:
            raise ValueError('MetricsWriter is closed.')
        if 'round' not in record:
            raise ValueError(f"Record has no 'round': {sorted(record)}")
        clean = {k: _to_python_scalar(k, v) for k, v in record.items()}
        step = clean['round']
        if not isinstance(step, int) or isinstance(step, bool):
            raise TypeError(f"'round' must be an int, got {record['round']!r}.")
        if self._last_round is not None and step <= self._last_round:
            raise ValueError(
                f'Round {step} is not after the last logged round '
                f'{self._last_round} in {self.path}; pass resume_from_round '
                'when restarting so old rounds are dropped first.'
            )
        line = (json.dumps(clean, sort_keys=True) + '\n').encode('utf-8')
        # One write on an O_APPEND fd: a kill leaves either no line or a
        # whole one (or, at worst, a partial tail that the next open cuts).
        written = os.write(self._fd, line)
        if written != len(line):
            raise OSError(f'Short write to {self.path}: {written}/{len(line)}.')
        os.fsync(self._fd)
        self._last_round = step
        # Not fsynced: a torn event is rebuilt from metrics.jsonl on the next open.
        os.write(self._tb_fd, _tfrecord(_scalar_event(clean, time.time()).SerializeToString()))

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """`write({'round': step, **scalars})`: the writers' interface."""
        self.write({**scalars, 'round': step})

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """The run's hyperparameters for TensorBoard (the event file is rebuilt with them; the
        same hyperparameters again change nothing)."""
        if self._fd is None:
            raise ValueError('MetricsWriter is closed.')
        if self._hparams == dict(hparams):
            return
        self._hparams = dict(hparams)
        os.close(self._tb_fd)
        records = read_metrics(self.path)
        self._tb_fd = os.open(
            _open_event_log(self.tensorboard_dir, records, self._hparams),
            os.O_WRONLY | os.O_APPEND,
        )

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            os.close(self._tb_fd)
            self._fd = self._tb_fd = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
