"""What a run tells the person watching it: short lines on stdout, each with the seconds elapsed.

    0.0 s  fashion_mnist / lenet5: 100 clients, 10 per round, 500 rounds -> runs/fmnist
    0.0 s  loading fashion_mnist
    1.3 s  splitting 60000 + 10000 examples over 100 clients (Dirichlet alpha 0.2)
    1.6 s  initializing 100 clients (LeNet-5: 430500 masked weights, 580 thresholds)
    3.0 s  round 1 compiles (the first evaluation compiles too)
   13.1 s  round 5/500 | accuracy 36.13% | density 92.64% | sent 11.1 Mbit | 8.21 s/round | ETA 1:07:44

Detail (every evaluated round with its loss and bits each way, checkpoints, resumes) goes through
absl logging on stderr, shown with `--verbosity=0`. Only process 0 of a multi-host run prints.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


BIT_UNITS = (('Tbit', 1e12), ('Gbit', 1e9), ('Mbit', 1e6), ('kbit', 1e3), ('bit', 1.0))


def bit_unit(largest: float) -> tuple[str, float]:
    """The unit in which `largest` bits reads with 1 to 3 digits before the point."""
    for unit, scale in BIT_UNITS:
        if largest >= scale:
            return unit, scale
    return BIT_UNITS[-1]


def format_bits(bits: float) -> str:
    """`bits` with the unit that keeps 1-3 digits before the point: 1.41 Mbit, 55.1 Gbit."""
    unit, scale = bit_unit(bits)
    return f'{bits:.0f} bit' if unit == 'bit' else f'{bits / scale:.3g} {unit}'


def format_duration(seconds: float) -> str:
    """H:MM:SS (or M:SS under an hour); '?' before anything was measured."""
    if not seconds == seconds or seconds < 0:  # NaN
        return '?'
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f'{hours}:{minutes:02d}:{secs:02d}' if hours else f'{minutes}:{secs:02d}'


class Console:
    """Progress lines on `stream` (stdout), each prefixed with the seconds since the console began.

    A disabled console (another process of a multi-host run, or a caller that wants silence) prints
    nothing.
    """

    def __init__(self, stream: TextIO | None = None, enabled: bool = True):
        self.stream = stream if stream is not None else sys.stdout
        self.enabled = enabled
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def line(self, text: str) -> None:
        if self.enabled:
            self.stream.write(f'{self.elapsed():7.1f} s  {text}\n')
            self.stream.flush()

    def round_line(
        self,
        round_: int,
        rounds: int,
        record: dict,
        seconds_per_round: float,
    ) -> None:
        """One evaluated round: accuracy, density, bits sent so far, steady s/round and the ETA."""
        sent = record['bits_up'] + record['bits_down']
        if seconds_per_round == seconds_per_round:  # not NaN
            eta = format_duration(seconds_per_round * (rounds - round_))
            pace = f'{seconds_per_round:.2f} s/round | ETA {eta}'
        else:
            pace = 'compiling'
        self.line(
            f'round {round_}/{rounds} | accuracy {100 * record["accuracy"]:.2f}% | '
            f'density {100 * record["density"]:.2f}% | sent {format_bits(sent)} | {pace}'
        )


class RoundTimer:
    """Steady seconds per round, over the whole run and across resumes.

    A round that compiles something — the first round a process runs, and the first round it
    evaluates in — is left out, so that a resumed run reports what a round costs, not what
    compiling costs. The totals travel in the checkpoint (`state()`), and a run whose process
    never ran a steady round reports NaN until one does.
    """

    def __init__(self, saved: dict | None = None):
        saved = saved or {}
        self.seconds = float(saved.get('seconds', 0.0))
        self.rounds = int(saved.get('rounds', 0))
        self.first: float | None = None  # this process's first round, compiling included
        self._ran = False
        self._evaluated = False

    def add(self, seconds: float, evaluated: bool) -> None:
        compiles = not self._ran or (evaluated and not self._evaluated)
        if self.first is None:
            self.first = seconds
        self._ran = True
        self._evaluated = self._evaluated or evaluated
        if not compiles:
            self.seconds += seconds
            self.rounds += 1

    def per_round(self) -> float:
        return self.seconds / self.rounds if self.rounds else float('nan')

    def state(self) -> dict:
        return {'seconds': self.seconds, 'rounds': self.rounds}
