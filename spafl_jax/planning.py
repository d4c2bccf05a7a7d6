"""Host-side planning of a round: which device and lane runs which client's local steps, and in
what order (longest first), built from the sampled ids and the start-up step counts, with fixed
shapes so that no round retraces."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class RoundPlan:
    """Where every local step of a round runs. Built on the host from the sampled ids and the
    start-up step counts (no device round trip); every array has a fixed shape, so no retracing.

    Attributes:
      sampled: [devices * per_device] client ids, device-major; -1 marks an empty position.
      positions: [devices, max_slots, lanes] the position (within the device) of the client a lane
        steps at each slot.
      steps: [devices, max_slots, lanes] index of that step in the client's `local_schedule`.
      valid: [devices, max_slots, lanes] False for padding.
      slots: [devices] slots the device really needs (the in-jit trip count).
      real_steps: local steps of the round (sum over sampled clients).
    """

    sampled: np.ndarray
    positions: np.ndarray
    steps: np.ndarray
    valid: np.ndarray
    slots: np.ndarray
    real_steps: int

    def executed_steps(self) -> int:
        """Steps the hardware runs: each device's slots times its lanes, padding included."""
        return int(self.slots.sum()) * self.positions.shape[2]


def _least_loaded(loads: list[int], sizes: list[int], capacity: int) -> int:
    free = [i for i in range(len(loads)) if sizes[i] < capacity]
    return min(free, key=lambda i: (loads[i], i))


def plan_round(
    sampled: np.ndarray,
    steps_per_epoch: np.ndarray,
    *,
    epochs: int,
    stride: int,
    devices: int,
    lanes: int,
    max_slots: int,
) -> RoundPlan:
    """Packs the sampled clients onto devices, then lanes, longest first (LPT scheduling).

    Args:
      sampled: [S] client ids.
      steps_per_epoch: [num_clients] real steps per epoch of every client
        (`client.steps_per_epoch`).
      epochs: local epochs.
      stride: steps per epoch of the padded schedule (`client.steps_per_epoch` of max_count).
      devices, lanes: mesh size and lanes per device.
      max_slots: the fixed slot-table length (an upper bound on any lane's steps).
    """
    sampled = np.asarray(sampled, np.int64)
    per_device = -(-len(sampled) // devices)
    lanes = min(lanes, per_device)
    order = sorted(sampled.tolist(), key=lambda c: (-int(steps_per_epoch[c]), c))
    members: list[list[int]] = [[] for _ in range(devices)]
    loads = [0] * devices
    for c in order:
        d = _least_loaded(loads, [len(m) for m in members], per_device)
        members[d].append(c)
        loads[d] += int(steps_per_epoch[c]) * epochs
    table_sampled = np.full((devices, per_device), -1, np.int32)
    positions = np.zeros((devices, max_slots, lanes), np.int32)
    steps = np.zeros((devices, max_slots, lanes), np.int32)
    valid = np.zeros((devices, max_slots, lanes), bool)
    slots = np.zeros(devices, np.int32)
    for d, clients in enumerate(members):
        table_sampled[d, : len(clients)] = clients
        queues: list[list[int]] = [[] for _ in range(lanes)]
        lane_loads = [0] * lanes
        for pos, c in enumerate(clients):  # already longest first
            lane = _least_loaded(lane_loads, [0] * lanes, 1)
            queues[lane].append(pos)
            lane_loads[lane] += int(steps_per_epoch[c]) * epochs
        for lane, queue in enumerate(queues):
            t = 0
            for pos in queue:
                n = int(steps_per_epoch[clients[pos]])
                for e in range(epochs):
                    positions[d, t : t + n, lane] = pos
                    steps[d, t : t + n, lane] = e * stride + np.arange(n)
                    valid[d, t : t + n, lane] = True
                    t += n
            if t > max_slots:
                raise ValueError(
                    f'a lane needs {t} steps, more than the table holds ({max_slots}).'
                )
            # Padding repeats the lane's last position so a padded step reads a real client.
            if queue:
                positions[d, t:, lane] = queue[-1]
        slots[d] = max(lane_loads) if lane_loads else 0
    real_steps = int(sum(int(steps_per_epoch[c]) * epochs for c in sampled))
    return RoundPlan(
        sampled=table_sampled.reshape(-1),
        positions=positions,
        steps=steps,
        valid=valid,
        slots=slots,
        real_steps=real_steps,
    )


def max_lane_steps(steps_per_epoch: np.ndarray, epochs: int, per_device: int) -> int:
    """An upper bound on the steps of any lane: the `per_device` largest clients back to back."""
    largest = np.sort(np.asarray(steps_per_epoch))[::-1][:per_device]
    return max(int(largest.sum()) * epochs, 1)
