"""What SpaFL reports (docs/algorithm.md, section 7): accuracy, density, communication in bits
and training FLOPs."""

from __future__ import annotations

import flax.linen as nn
from flax import traverse_util
import jax.numpy as jnp
import numpy as np

BITS_PER_FLOAT = 32


def spafl_bits_per_round(
    num_thresholds: int, num_clients: int, clients_per_round: int, *, importance_update: str
) -> tuple[int, int]:
    """(uplink, downlink) bits of one SpaFL round.

    Up: every sampled client sends its thresholds. Down: the global thresholds go to the sampled
    clients, and the delta goes to every client ('all_after') or to the sampled ones
    ('sampled_before'); with no importance update nothing more is sent.
    """
    per_model = num_thresholds * BITS_PER_FLOAT
    up = clients_per_round * per_model
    delta_receivers = {'all_after': num_clients, 'sampled_before': clients_per_round, 'none': 0}[
        importance_update
    ]
    return up, clients_per_round * per_model + delta_receivers * per_model


def dense_bits_per_round(num_params: int, clients_per_round: int) -> int:
    """Bits a dense method (FedAvg) sends each way per round: every parameter, sampled clients."""
    return clients_per_round * num_params * BITS_PER_FLOAT


def accuracy_summary(correct: np.ndarray, counts: np.ndarray) -> dict[str, float]:
    """Unweighted mean over clients of each client's accuracy, and the test-size-weighted mean."""
    correct = np.asarray(correct, np.float64)
    counts = np.asarray(counts, np.float64)
    has_test = counts > 0
    per_client = correct[has_test] / counts[has_test]
    return {
        'accuracy': float(per_client.mean()),
        'accuracy_weighted': float(correct.sum() / max(counts.sum(), 1.0)),
        'accuracy_std': float(per_client.std()),
    }


def density_summary(
    layer_density: np.ndarray,
    kept_weights: np.ndarray,
    *,
    masked_weights: int,
    layer_names: list[str],
) -> dict[str, float]:
    """Official density (mean over layers of kept rows) and parameter-weighted density, client means.

    layer_density: [clients, layers] kept-row fractions; kept_weights: [clients] kept masked weights.
    """
    layer_density = np.asarray(layer_density, np.float64)
    out = {
        'density': float(layer_density.mean()),
        'density_weighted': float(np.mean(np.asarray(kept_weights, np.float64) / masked_weights)),
    }
    for name, value in zip(layer_names, layer_density.mean(axis=0)):
        out[f'density/{name}'] = float(value)
    return out


def layer_macs(model: nn.Module, variables, image_shape):
    """Multiply-accumulates per example of every masked layer, shaped like the thresholds."""
    _, sown = model.apply(
        variables, jnp.zeros((1, *image_shape), jnp.float32), train=False, mutable=['macs']
    )
    flat = traverse_util.flatten_dict(sown['macs'])
    return traverse_util.unflatten_dict(
        {path[:-1] + ('threshold',): float(value[0]) for path, value in flat.items()}
    )
