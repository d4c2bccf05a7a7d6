"""A run's records: what the host makes of each round once its results are there (the divergence
checks, the running totals, the metrics line, the first layer's sparsity pattern) and the summary.

`Recorder` keeps what a checkpoint must carry to resume the records exactly (`progress`), so that a
resumed run writes the lines an uninterrupted one would have written.
"""

from __future__ import annotations

import os
import time
from typing import Any

from absl import logging
import jax
import numpy as np

from spafl_jax import console as console_lib
from spafl_jax import execution
from spafl_jax import masking
from spafl_jax import metrics as metrics_lib
from spafl_jax import reporting
from spafl_jax import workdir as workdir_lib
from spafl_jax.workdir import DIVERGED_FILENAME


class NonFiniteError(RuntimeError):
    """Training produced a NaN or infinity, or a loss above `config.max_loss`: it diverged. The
    last good checkpoint is left as it was."""


def pack_masks(masks: np.ndarray) -> dict[str, Any]:
    """[clients, rows] 0/1 masks as a JSON value (a checkpoint's progress record holds them)."""
    masks = np.asarray(masks) != 0
    return {'shape': list(masks.shape), 'bits': np.packbits(masks).tobytes().hex()}


def unpack_masks(packed: dict[str, Any]) -> np.ndarray:
    shape = tuple(packed['shape'])
    bits = np.unpackbits(np.frombuffer(bytes.fromhex(packed['bits']), np.uint8))
    return bits[: int(np.prod(shape))].reshape(shape).astype(np.float32)


def draw_sparsity(workdir: str, layer: str, round_: int, packed: dict[str, Any]) -> None:
    reporting.plot_sparsity_pattern(
        unpack_masks(packed),
        os.path.join(workdir, f'sparsity_round_{round_:04d}.png'),
        layer=layer,
        round_=round_,
    )


class ModelFacts:
    """What a run reports about one client's model: layer names, sizes, bits sent per round."""

    def __init__(self, run, settings, first_client):
        variables = {
            'params': first_client.params,
            'thresholds': first_client.thresholds,
            'batch_stats': first_client.batch_stats,
        }
        self.names = masking.layer_names(first_client.thresholds)
        self.num_thresholds = sum(t.size for t in jax.tree.leaves(first_client.thresholds))
        self.masked_weights = sum(
            k.size
            for k in jax.tree.leaves(
                masking.kernels_of(first_client.params, first_client.thresholds)
            )
        )
        self.num_params = sum(p.size for p in jax.tree.leaves(first_client.params))
        self.bits_up, self.bits_down = run.method.bits_per_round(
            settings.num_clients, settings.clients_per_round, variables, settings.importance_update
        )
        self.dense_bits = metrics_lib.dense_bits_per_round(
            self.num_params, settings.clients_per_round
        )


class Recorder:
    """Turns each round's results into records: checks, totals, metrics lines, sparsity figures.

    `progress` (restored from a checkpoint, or None) holds the totals, the sparsity patterns and
    the round timer as of the checkpoint's round.
    """

    def __init__(
        self, settings, facts: ModelFacts, workdir, writer, records, console, lead, checkpoints
    ):
        self.settings, self.facts, self.workdir = settings, facts, workdir
        self.writer, self.records, self.console, self.lead = writer, records, console, lead
        self.checkpoints = checkpoints  # the directory a failure message points to
        self.totals = {'bits_up': 0, 'bits_down': 0, 'flops': 0.0, 'steps': 0.0, 'max_steps': 0.0}
        self.sparsity = {}  # round (a string, as JSON keys are) -> packed first-layer masks
        self.timer = console_lib.RoundTimer()
        self.round_seconds = []
        self.clock = time.time()  # the end of the previous round's host work

    def resume(self, progress: dict) -> None:
        self.totals = progress['totals']
        self.sparsity = dict(progress.get('sparsity', {}))  # absent in older checkpoints
        self.timer = console_lib.RoundTimer(progress.get('timing'))  # absent in older ones too

    def progress(self, rounds_done: int) -> dict:
        return {
            'round': rounds_done,
            'totals': self.totals,
            'sparsity': self.sparsity,
            'timing': self.timer.state(),
        }

    def restart_clock(self) -> None:
        self.clock = time.time()

    def process(self, pending) -> None:
        """The host's part of round r, once its results are there: checks, totals, records."""
        r, sampled, round_metrics, evaluation, finite, masks = pending
        settings, facts, totals = self.settings, self.facts, self.totals
        evaluate_now = evaluation is not None
        round_metrics, evaluation, finite, masks = execution.host_local(
            (round_metrics, evaluation, finite, masks)
        )
        if masks is not None:
            masks = masks[: settings.num_clients]  # no phantom clients
        # From the end of the previous round's host work (its figures are not this round's time).
        self.round_seconds.append(time.time() - self.clock)
        self._check(r, sampled, round_metrics, finite)
        totals['bits_up'] += facts.bits_up
        totals['bits_down'] += facts.bits_down
        totals['flops'] += float(round_metrics['flops'])
        totals['steps'] += float(round_metrics['local_steps'])
        totals['max_steps'] += float(round_metrics['max_steps'])
        self.timer.add(self.round_seconds[-1], evaluated=evaluate_now)
        if masks is not None:
            self.sparsity[str(r + 1)] = pack_masks(masks)
            if self.lead:
                draw_sparsity(self.workdir, facts.names[0], r + 1, self.sparsity[str(r + 1)])
        if evaluate_now:
            self._record(r, round_metrics, evaluation)
        self.clock = time.time()

    def _check(self, r: int, sampled, round_metrics, finite) -> None:
        """Raises NonFiniteError (and writes diverged.json) if round r diverged."""
        sampled = np.asarray(sampled).tolist()
        intact = f'the last good checkpoint in {self.checkpoints} is intact'
        loss = float(round_metrics['train_loss'])
        bad = [
            part
            for part, ok in (('loss', np.isfinite(round_metrics['train_loss'])), *finite.items())
            if not ok
        ]
        max_loss = float(self.settings.max_loss)
        if bad:
            failure = (
                f'round {r + 1}: non-finite {", ".join(bad)} (sampled clients {sampled}); '
                f'{intact}. Lower config.lr or set config.clip.'
            )
        elif loss > max_loss:
            failure = (
                f'round {r + 1}: training loss {loss:.3g} is above config.max_loss={max_loss:g}: '
                f'the run diverged (sampled clients {sampled}); {intact}. Lower config.lr or '
                'config.th_coeff, or set config.clip.'
            )
        else:
            return
        if self.lead:
            reporting.write_json_atomic(
                os.path.join(self.workdir, DIVERGED_FILENAME), {'round': r + 1, 'error': failure}
            )
        raise NonFiniteError(failure)

    def _record(self, r: int, round_metrics, evaluation) -> None:
        settings, facts, totals = self.settings, self.facts, self.totals
        record = {
            'round': r + 1,
            'evaluated_clients': int(len(evaluation['counts'])),
            **metrics_lib.accuracy_summary(evaluation['correct'], evaluation['counts']),
            **metrics_lib.density_summary(
                evaluation['layer_density'],
                evaluation['kept_weights'],
                masked_weights=facts.masked_weights,
                layer_names=facts.names,
            ),
            'bits_up': totals['bits_up'],
            'bits_down': totals['bits_down'],
            'bits_dense_equivalent': facts.dense_bits * (r + 1),
            'flops': totals['flops'] / settings.num_clients,
            'train_loss': float(round_metrics['train_loss']),
            'useful_step_fraction': totals['steps'] / max(totals['max_steps'], 1.0),
        }
        try:
            if self.lead:
                self.writer.write_scalars(
                    record['round'], {k: v for k, v in record.items() if k != 'round'}
                )
        except OSError as e:
            raise workdir_lib.disk_error(e, self.workdir, reporting.METRICS_FILENAME) from None
        self.records.append(record)
        logging.info(
            'round %d/%d | accuracy %.2f%% | density %.2f%% (weights %.2f%%) '
            '| up %s down %s | loss %.3f | %.2fs',
            r + 1,
            settings.rounds,
            100 * record['accuracy'],
            100 * record['density'],
            100 * record['density_weighted'],
            console_lib.format_bits(record['bits_up']),
            console_lib.format_bits(record['bits_down']),
            record['train_loss'],
            self.round_seconds[-1],
        )
        self.console.round_line(r + 1, settings.rounds, record, self.timer.per_round())

    def summary(self, previous: dict | None, summary_path: str) -> dict:
        """The run's summary: the last record, the model's sizes and the timings. `previous` is
        the summary already in the workdir of a complete run: when nothing ran now, its timings
        are kept if everything else in it is what the checkpoint and the metrics say."""
        facts, timer = self.facts, self.timer
        # Steady rounds of the whole run (compiling rounds left out, resumes included); a run too
        # short to have one reports the mean of what it ran.
        per_round = timer.per_round()
        if per_round != per_round and self.round_seconds:
            per_round = float(np.mean(self.round_seconds))
        summary = {
            **self.records[-1],
            'rounds': self.settings.rounds,
            'num_thresholds': facts.num_thresholds,
            'masked_weights': facts.masked_weights,
            'num_params': facts.num_params,
            'seconds_first_round': timer.first if timer.first is not None else float('nan'),
            'seconds_per_round': per_round,
        }
        timings = ('seconds_first_round', 'seconds_per_round')
        without = lambda d: {k: v for k, v in d.items() if k not in timings}
        if previous is not None and not self.round_seconds:
            if without(previous) == without(reporting.json_ready(summary)):
                return previous
            logging.warning(
                '%s does not match the metrics of the run; it is written again.', summary_path
            )
        return summary
