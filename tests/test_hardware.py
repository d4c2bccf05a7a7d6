"""Tests for spafl_jax.hardware: which models compile with YNNPACK off, and that the option reaches XLA."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from spafl_jax import hardware, models


def test_models_measured_faster_without_ynnpack_get_the_option_on_cpu_only():
    cpu = lambda name: models.create_model(name, 10, backend='cpu')
    assert hardware.compiler_options(cpu('lenet5'), 'cpu') == hardware.YNNPACK_OFF
    assert hardware.compiler_options(cpu('digits_cnn'), 'cpu') == hardware.YNNPACK_OFF
    assert hardware.compiler_options(cpu('conv4'), 'cpu') == {}  # its BatchNorm wants YNNPACK
    assert hardware.compiler_options(models.LeNet5(), 'cpu') == {}  # plain: XLA's defaults
    assert hardware.compiler_options(cpu('lenet5'), 'gpu') == {}
    assert hardware.compiler_options(cpu('lenet5'), 'tpu') == {}
    assert hardware.compiler_options(None, 'cpu') == {}


def _compiled_text(jit, model):
    variables = models.init_variables(model, jax.random.key(0), (28, 28, 1))
    loss = lambda p, x: jnp.sum(model.apply({**variables, 'params': p}, x) ** 2)
    fn = jit(jax.grad(loss))
    return fn.lower(variables['params'], jnp.ones((4, 28, 28, 1))).compile().as_text()


def test_the_option_reaches_the_compiled_program():
    model = models.LeNet5(xla_cpu_ynnpack=False)
    # XLA's default hands this program's dots and reductions to YNNPACK; ours keeps them.
    assert '__ynn_fusion' in _compiled_text(jax.jit, model)
    assert '__ynn_fusion' not in _compiled_text(lambda f: hardware.jit(f, model=model), model)


def test_caller_options_reach_the_program_too():
    model = models.LeNet5(xla_cpu_ynnpack=True)  # no options of its own
    assert '__ynn_fusion' in _compiled_text(lambda f: hardware.jit(f, model=model), model)
    assert '__ynn_fusion' not in _compiled_text(
        lambda f: hardware.jit(f, model=model, compiler_options=hardware.YNNPACK_OFF), model
    )
