r"""What the order-fixed mean costs: `server.aggregate` as the runner calls it (the clients sharded
over the mesh, gathered and added in client-id order) against the psum of per-device partial sums
it replaced, in one process, timed alternately.

    python research/benchmarks/aggregation.py                 # 2 CPU devices
    python research/benchmarks/aggregation.py --devices=4 --sampled=10,100,1000

Messages: SpaFL's (LeNet-5's 580 thresholds) and FedAvg's (LeNet-5's 430,500 weights). Each
sampled client sits on one device's share (`sampled` / devices each). Prints the median
microseconds per call of each and their ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--devices', type=int, default=2)
    parser.add_argument('--sampled', default='10,100')
    parser.add_argument('--repeats', type=int, default=200)
    args = parser.parse_args()

    import jax  # pylint: disable=g-import-not-at-top

    jax.config.update('jax_num_cpu_devices', args.devices)
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top

    from spafl_jax import algorithm, mesh, server  # pylint: disable=g-import-not-at-top

    devices = mesh.make_mesh(args.devices)

    def psum_mean(messages, weights, order):
        del order
        weights = weights.astype(jnp.float32)
        summed = jax.tree.map(lambda t: jnp.tensordot(weights, t, axes=1), messages)
        summed, total = jax.lax.psum((summed, jnp.sum(weights)), 'clients')
        return jax.tree.map(lambda s: s / total, summed)

    def ordered_mean(messages, weights, order):
        return server.aggregate(messages, weights, axis_name='clients', order=order)

    print(f'{"message":<22} {"sampled":>7} {"psum us":>9} {"ordered us":>10} {"ordered/psum":>12}')
    for label, size in (('SpaFL thresholds', 580), ('FedAvg weights', 430_500)):
        for sampled in (int(s) for s in args.sampled.split(',')):
            rng = np.random.default_rng(0)
            messages = {'w': jnp.asarray(rng.normal(size=(sampled, size)), jnp.float32)}
            weights = jnp.ones((sampled,), jnp.float32)
            ids = rng.permutation(sampled).astype(np.int32)
            order = jnp.asarray(algorithm.client_order(jnp.asarray(ids), sampled))
            fns = {
                name: jax.jit(
                    jax.shard_map(
                        fn,
                        mesh=devices,
                        in_specs=(P('clients'), P('clients'), P()),
                        out_specs=P(),
                        check_vma=False,
                    )
                )
                for name, fn in (('psum', psum_mean), ('ordered', ordered_mean))
            }
            times = {name: [] for name in fns}
            for fn in fns.values():
                jax.block_until_ready(fn(messages, weights, order))  # compiles
            for _ in range(args.repeats):
                for name, fn in fns.items():
                    start = time.perf_counter()
                    jax.block_until_ready(fn(messages, weights, order))
                    times[name].append(time.perf_counter() - start)
            psum, ordered = (1e6 * float(np.median(times[n])) for n in ('psum', 'ordered'))
            print(f'{label:<22} {sampled:>7} {psum:>9.0f} {ordered:>10.0f} {ordered / psum:>12.2f}')


if __name__ == '__main__':
    main()
