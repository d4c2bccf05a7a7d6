"""Every hardware choice in one place: the only module that reads which backend JAX runs on.

The algorithm core (masking, layers, models, client, server, algorithm, federated, baselines) is
plain JAX and computes the same thing everywhere; what is chosen here only makes it run faster or
on more devices: the models' CPU settings (`specialize`), the XLA options a model compiles with
(`jit`), the execution strategy over the client axis (`resolve_client_execution`), and the runtime
set-up (simulated CPU devices, multi-host start-up, collectives across processes).
"""

from __future__ import annotations

import functools
import os
from typing import Any
from collections.abc import Callable

from absl import logging
import flax.linen as nn
import jax
import numpy as np

from spafl_jax import checks

CLIENT_EXECUTIONS = ('auto', 'map', 'vmap')
DISTRIBUTED = ('off', 'auto')  # config.distributed


# ------------------------------------------------------------------------------------------------
# Models and compiled programs.

# How each model runs fastest on XLA:CPU (BENCHMARKS.md, "Layouts and YNNPACK"): im2col convolutions
# everywhere (XLA:CPU runs `lax.conv` inside a loop about 7x slower), and for the two small CNNs the
# CNHW layout with YNNPACK off (a LeNet-5 training step 2.3x faster). Not measured on GPU or TPU,
# where the models keep XLA's convolutions in NHWC.
CPU_SETTINGS = {  # by the model's class name (spafl_jax/models.py)
    'DigitsCNN': {'conv_impl': 'im2col', 'layout': 'CNHW', 'xla_cpu_ynnpack': False},
    'LeNet5': {'conv_impl': 'im2col', 'layout': 'CNHW', 'xla_cpu_ynnpack': False},
    'Conv4': {'conv_impl': 'im2col'},
    'ResNet18': {'conv_impl': 'im2col'},
}


def specialize(model: nn.Module, backend: str | None = None) -> nn.Module:
    """`model` with the settings that run fastest on `backend` (default: JAX's default backend):
    on CPU its `CPU_SETTINGS`; elsewhere unchanged. What it computes does not change."""
    if (backend or jax.default_backend()) != 'cpu':
        return model
    return model.clone(**CPU_SETTINGS.get(type(model).__name__, {}))


# An empty list of YNNPACK fusion types: dots go to XLA's own (Eigen) kernels, reductions and
# elementwise code to XLA's emitters.
YNNPACK_OFF = {'xla_cpu_experimental_ynn_fusion_type': ''}


@functools.cache
def cpu_accepts_ynnpack_off() -> bool:
    """Whether this XLA knows the option (compiling one tiny program, once per process)."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=YNNPACK_OFF).lower(np.float32(0)).compile()
        return True
    except jax.errors.JaxRuntimeError as e:
        logging.warning(
            'this XLA refuses %s (%s); programs compile with its defaults.',
            YNNPACK_OFF,
            str(e).splitlines()[0],
        )
        return False


def compiler_options(model: Any = None, backend: str | None = None) -> dict[str, Any]:
    """The options `jit` compiles `model`'s programs with on `backend` (default: JAX's default)."""
    backend = backend or jax.default_backend()
    if (
        backend == 'cpu'
        and not getattr(model, 'xla_cpu_ynnpack', True)
        and cpu_accepts_ynnpack_off()
    ):
        return dict(YNNPACK_OFF)
    return {}


def jit(fun: Callable, model: Any = None, **kwargs) -> Callable:
    """`jax.jit(fun, **kwargs)` with `compiler_options(model)` under any options the caller gives."""
    options = {**compiler_options(model), **(kwargs.pop('compiler_options', None) or {})}
    return jax.jit(fun, compiler_options=options or None, **kwargs)


# ------------------------------------------------------------------------------------------------
# The client axis and the runtime.


def clients_in_sequence(backend: str | None = None) -> bool:
    """Whether clients run fastest one after another on `backend` (CPU: per-client weights make
    vmapped matmuls slow there, BENCHMARKS.md) rather than vmapped (accelerators)."""
    return (backend or jax.default_backend()) == 'cpu'


def resolve_client_execution(name: str, backend: str | None = None) -> str:
    """'auto' -> the strategy measured fastest for the backend (BENCHMARKS.md); others unchanged.

    CPU: 'map' (one program per round, each client for its real steps only). GPU/TPU: 'vmap', which
    fills the device with several clients at once. (A Python loop of one compiled step per call,
    'loop', was measured against 'map' at the Fashion-MNIST workload and removed: it was not 10 %
    faster.)
    """
    if name not in CLIENT_EXECUTIONS:
        raise ValueError(f'client_execution={name!r}; use one of {", ".join(CLIENT_EXECUTIONS)}.')
    if name != 'auto':
        return name
    return 'map' if clients_in_sequence(backend) else 'vmap'


AUTO_CPU_DEVICES = -1  # config.num_cpu_devices: one CPU device per core, at most one per client


def auto_cpu_devices(clients_per_round: int) -> int:
    """CPU devices for `num_cpu_devices=-1`: one per core this process may run on, at most one per
    sampled client (more devices than clients would stay idle)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    return max(1, min(cores or 1, clients_per_round))


def initialize_runtime(
    *,
    coordinator_address: str | None = None,
    num_processes: int = 1,
    process_id: int = 0,
    num_cpu_devices: int = 0,
    clients_per_round: int = 1,
    distributed: str = 'off',
) -> None:
    """Multi-host start-up and simulated CPU devices; must run before JAX touches a device.

    With `coordinator_address`, `jax.distributed.initialize` joins `num_processes` processes (TPU
    pods, GPU hosts, or CPU processes whose collectives go through gloo). With `distributed='auto'`
    it is called without arguments and finds them itself, from the platform a pod or a job
    scheduler provides (Cloud TPU, Slurm, Open MPI, Kubernetes): the same command on every host.

    `num_cpu_devices > 0` splits the host CPU into that many devices: multi-device code on a laptop,
    and several clients training at once. `AUTO_CPU_DEVICES` (-1) takes `auto_cpu_devices`: on the
    project's 2 cores two devices made a Fashion-MNIST round 1.2x faster and the digits default 1.4x
    (BENCHMARKS.md), because one client's small ops do not keep both cores busy. Auto leaves the
    devices alone in a multi-process run, and when JAX has already started (in a notebook, say). The
    setting only concerns the CPU backend: a GPU or TPU run is not affected.
    """
    if distributed not in DISTRIBUTED:
        raise ValueError(f'distributed={distributed!r}; use one of {", ".join(DISTRIBUTED)}.')
    if num_cpu_devices == AUTO_CPU_DEVICES:
        alone = num_processes == 1 and distributed == 'off'
        count = auto_cpu_devices(clients_per_round) if alone else 1
        if count > 1:
            try:
                jax.config.update('jax_num_cpu_devices', count)
            except RuntimeError:
                logging.info(
                    'num_cpu_devices=-1 (auto): JAX has already started, so its CPU '
                    'devices stay as they are.'
                )
    elif num_cpu_devices > 0:
        jax.config.update('jax_num_cpu_devices', num_cpu_devices)
    if (coordinator_address or distributed == 'auto') and not jax.distributed.is_initialized():
        # CPU processes exchange the psum through gloo (the default of this JAX; set for clarity).
        jax.config.update('jax_cpu_collectives_implementation', 'gloo')
        if distributed == 'auto':
            try:
                jax.distributed.initialize()
            except ValueError as e:  # no cluster found: JAX asks for the values by hand
                raise checks.ConfigError(
                    "config.distributed='auto' found no multi-host platform here (TPU pod, "
                    'Slurm, Open MPI or Kubernetes): give config.coordinator_address, '
                    f'num_processes and process_id instead ({e})'
                ) from None
        else:
            jax.distributed.initialize(
                coordinator_address=coordinator_address,
                num_processes=num_processes,
                process_id=process_id,
            )


def initialize_from_config(settings) -> None:
    """`initialize_runtime` with a run's settings (`configuration.Settings`)."""
    initialize_runtime(
        coordinator_address=settings.coordinator_address or None,
        num_processes=settings.num_processes,
        process_id=settings.process_id,
        num_cpu_devices=settings.num_cpu_devices,
        clients_per_round=settings.clients_per_round,
        distributed=settings.distributed,
    )


def host_local(tree):
    """Every leaf as a full numpy array on this host: what a checkpoint writer or a figure needs.

    Leaves sharded across hosts are gathered, which is a collective: in a multi-host run every
    process must call this with the same tree, at the same point.
    """
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return multihost_utils.process_allgather(x, tiled=True)
        return jax.device_get(x)

    return jax.tree.map(one, tree)


def any_process(flag: bool) -> bool:
    """True on every process if `flag` is True on any (a collective in a multi-host run)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    return bool(np.any(multihost_utils.process_allgather(np.array([flag], np.int32))))


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier `name` (nothing to wait for on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

        multihost_utils.sync_global_devices(name)
