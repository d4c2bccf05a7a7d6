"""Accelerators without an accelerator: the runner's round and evaluation, for the paper's models as
an accelerator builds them (XLA's convolutions, NHWC), lowered for CUDA and TPU with `jax.export` on
this CPU-only machine. A change that breaks lowering for GPU or TPU (a CPU-only primitive, a
host callback, an unsupported sharding) fails here instead of on a user's TPU VM."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from spafl_jax import client as client_lib
from spafl_jax import execution
from spafl_jax import federated
from spafl_jax import models

NUM_CLIENTS, SAMPLED, EXAMPLES = 4, 2, 12
SHAPES = {'lenet5': (28, 28, 1), 'conv4': (32, 32, 3), 'resnet18': (32, 32, 3), 'vit': (32, 32, 3)}


def _runner(name: str):
    shape = SHAPES[name]
    model = models.create_model(name, 10, backend='gpu')  # what a GPU or TPU run builds
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (NUM_CLIENTS * EXAMPLES, *shape), dtype=np.uint8)
    labels = rng.integers(0, 10, NUM_CLIENTS * EXAMPLES).astype(np.int32)
    ids = [np.arange(i * EXAMPLES, (i + 1) * EXAMPLES) for i in range(NUM_CLIENTS)]
    data = federated.make_client_data(images, labels, ids)
    cfg = client_lib.LocalConfig(batch_size=4, local_epochs=1, lr=0.01)
    spec = client_lib.DataSpec(pixel_max=255.0, mean=(0.5,) * shape[-1], std=(0.25,) * shape[-1])
    runner = execution.RoundRunner(
        model,
        cfg,
        federated.RoundConfig(clients_per_round=SAMPLED),
        spec,
        data,
        data,
        strategy='vmap',  # the accelerators' strategy ('auto' there)
    )
    state = federated.init_state(
        model, cfg, jax.random.key(0), num_clients=NUM_CLIENTS, image_shape=shape
    )
    return runner, state


@pytest.mark.parametrize(
    'name',
    ['lenet5', *(pytest.param(n, marks=pytest.mark.slow) for n in ('conv4', 'resnet18', 'vit'))],
)
def test_round_and_evaluation_lower_for_cuda_and_tpu(name):
    runner, state = _runner(name)
    exported = runner.export(state, np.array([3, 0]), jax.random.key(1), platforms=('cuda', 'tpu'))
    assert set(exported) == {'round', 'evaluate'}
    for program in exported.values():
        assert program.platforms == ('cuda', 'tpu')
        text = program.mlir_module()
        # Lowered for devices, not for the host: no callback into Python inside a round.
        assert 'stablehlo' in text and 'host_callback' not in text and 'xla_python' not in text
    # The round keeps the state's structure: what it exports returns what run_round returns.
    out_state, out_metrics = jax.tree.unflatten(
        exported['round'].out_tree, exported['round'].out_avals
    )
    assert set(out_metrics) == {'train_loss', 'train_accuracy', 'local_steps', 'flops', 'max_steps'}
    assert jax.tree.structure(out_state) == jax.tree.structure(runner.place_state(state))
