"""The two ways a device runs its share of a round's clients, written for one device's shard (they
run inside `jax.shard_map`), over the same `step(client, opt_state, position, k, valid)`:

- 'map' (`map_clients`): the clients one after the other, each for exactly its real steps
  (`client.real_steps`, the one local-step loop): no padded steps; what CPUs run fastest.
- 'vmap' (`vmap_slots`): lanes of clients step together under `vmap`, each lane working through a
  queue of clients packed by step count (`planning.plan_round`); what accelerators want.

Both give the same bits as `algorithm.run_round` for every client (tests/test_multidevice.py).
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp

from spafl_jax import client as client_lib


@flax.struct.dataclass
class RoundWork:
    """The sampled clients of a round on one device, `[per_device, ...]`, while they train."""

    clients: Any  # as `Algorithm.client_start` started them
    opt_state: Any  # this round's optimizer state
    metrics: Any  # per-client sums: loss, correct, steps, flops
    batch_ids: jax.Array  # [per_device, schedule_steps, batch] example ids of every step
    batch_mask: Any  # [per_device, schedule_steps, batch] real examples; None: all full
    step_keys: jax.Array  # [per_device, schedule_steps] augmentation keys
    steps_per_epoch: jax.Array  # [per_device] real steps per epoch; 0 for an empty position
    weights: jax.Array  # [per_device] aggregation weight; 0 for an empty position
    final_ids: Any = None  # [per_device, batch] the batch of `Algorithm.client_final`, if any
    final_keys: Any = None  # [per_device] its keys


def take(tree, i):
    return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, keepdims=False), tree)


def put(tree, i, value):
    return jax.tree.map(lambda x, v: jax.lax.dynamic_update_index_in_dim(x, v, i, 0), tree, value)


def map_clients(work: RoundWork, step, cfg, stride: int, unroll: int) -> RoundWork:
    """'map': this device's clients one after the other, each for exactly its real steps
    (`client.real_steps`: no padded steps, one program per round). `stride` is the schedule's
    steps per epoch (`client.local_schedule`)."""

    def one_client(i, work):
        def body(carry, k):
            client, opt_state = carry
            c, o, m = step(client, opt_state, i, k, jnp.bool_(True))
            return (c, o), m

        (client, opt_state), metrics = client_lib.real_steps(
            cfg,
            body,
            (take(work.clients, i), take(work.opt_state, i)),
            work.steps_per_epoch[i],
            stride,
            unroll,
        )
        return work.replace(
            clients=put(work.clients, i, client),
            opt_state=put(work.opt_state, i, opt_state),
            metrics=put(work.metrics, i, metrics),
        )

    per_device = work.steps_per_epoch.shape[0]
    return jax.lax.fori_loop(0, per_device, one_client, work)


def vmap_slots(work: RoundWork, step, positions, steps, valid, slots, unroll: int) -> RoundWork:
    """'vmap': all lanes step together, `slots` times; lane l steps client positions[t, l]
    (`planning.RoundPlan`)."""
    u = unroll
    per_device = work.steps_per_epoch.shape[0]
    direct = positions.shape[1] == per_device  # lane l is client l: no gather, no scatter

    def slot(t, work):
        if direct:
            c, o, m = jax.vmap(step)(
                work.clients, work.opt_state, jnp.arange(per_device), steps[t], valid[t]
            )
            return work.replace(
                clients=c, opt_state=o, metrics=jax.tree.map(jnp.add, work.metrics, m)
            )
        pos = positions[t]
        take_lanes = lambda tree: jax.tree.map(lambda x: x[pos], tree)
        c, o, m = jax.vmap(step)(
            take_lanes(work.clients), take_lanes(work.opt_state), pos, steps[t], valid[t]
        )
        put_lanes = lambda tree, v: jax.tree.map(lambda x, y: x.at[pos].set(y), tree, v)
        return work.replace(
            clients=put_lanes(work.clients, c),
            opt_state=put_lanes(work.opt_state, o),
            metrics=jax.tree.map(lambda a, v: a.at[pos].add(v), work.metrics, m),
        )

    def unrolled(i, work):
        for j in range(u):
            work = slot(i * u + j, work)
        return work

    return jax.lax.fori_loop(0, (slots + u - 1) // u, unrolled, work)
