"""`jax.jit` with the XLA compiler options a model was measured fastest with.

On CPU, XLA hands dots, reductions and elementwise code to YNNPACK by default. That helps some of our
models and hurts others: with YNNPACK off, a LeNet-5 training step in the CNHW layout is about 2.3x
faster on the project's machine, while Conv4's BatchNorm reductions are faster with it (BENCHMARKS.md,
"Layouts and YNNPACK"). Each model says which it wants (`models.MaskedNet.xla_cpu_ynnpack`). The
options belong to one compiled program, so JAX code around ours keeps XLA's defaults, and
accelerators get none.
"""

from __future__ import annotations

import functools
from typing import Any
from collections.abc import Callable

from absl import logging
import jax
import numpy as np

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
