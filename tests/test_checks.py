"""The library's configuration dataclasses refuse bad values on construction, in one line."""

import dataclasses

import pytest

from spafl_jax import checks
from spafl_jax import client
from spafl_jax import configuration
from spafl_jax import federated

BAD = [
    # A misspelt choice used to be accepted and silently skip the importance update.
    (
        federated.RoundConfig,
        dict(importance_update='all-after'),
        "RoundConfig.importance_update='all-after' is not allowed; use one of: all_after, "
        'sampled_before, none.',
    ),
    (federated.RoundConfig, dict(aggregation='mean'), "RoundConfig.aggregation='mean'"),
    (federated.RoundConfig, dict(client_execution='pmap'), "RoundConfig.client_execution='pmap'"),
    (
        federated.RoundConfig,
        dict(clients_per_round=0),
        'RoundConfig.clients_per_round=0 must be > 0.',
    ),
    (
        federated.RoundConfig,
        dict(clients_per_round=2.5),
        'RoundConfig.clients_per_round=2.5 must be an integer.',
    ),
    (client.LocalConfig, dict(batch_size=0), 'LocalConfig.batch_size=0 must be > 0.'),
    (
        client.LocalConfig,
        dict(local_epochs=True),
        'LocalConfig.local_epochs=True must be an integer.',
    ),
    (client.LocalConfig, dict(lr=-0.1), 'LocalConfig.lr=-0.1 must be >= 0.'),
    (client.LocalConfig, dict(lr=float('nan')), 'LocalConfig.lr=nan must be a finite number.'),
    (client.LocalConfig, dict(lr_decay=1.5), 'LocalConfig.lr_decay=1.5 must be <= 1.0.'),
    (client.LocalConfig, dict(momentum=-1.0), 'LocalConfig.momentum=-1.0 must be >= 0.'),
    (client.LocalConfig, dict(th_coeff='0.1'), "LocalConfig.th_coeff='0.1' must be a number."),
    (client.LocalConfig, dict(drop_last=1), 'LocalConfig.drop_last=1 must be True or False.'),
    (client.LocalConfig, dict(collapse_check='next'), "LocalConfig.collapse_check='next'"),
    (client.DataSpec, dict(pixel_max=0.0), 'DataSpec.pixel_max=0.0 must be > 0.'),
    (client.DataSpec, dict(mean=(0.5, 0.5)), 'need one value per channel each'),
    (client.DataSpec, dict(std=(0.0,)), 'DataSpec.std[0]=0.0 must be > 0.'),
    (client.DataSpec, dict(augment='flip'), "DataSpec.augment='flip'"),
]


@pytest.mark.parametrize(
    'cls,kwargs,message', BAD, ids=[f'{c.__name__}-{next(iter(k))}' for c, k, _ in BAD]
)
def test_a_bad_value_is_refused_on_construction(cls, kwargs, message):
    with pytest.raises(checks.ConfigError) as raised:
        cls(**kwargs)
    assert message in str(raised.value)
    assert '\n' not in str(raised.value)


@pytest.mark.parametrize('cls,kwargs,message', BAD[:3], ids=['importance', 'aggregation', 'exec'])
def test_replace_checks_too(cls, kwargs, message):
    with pytest.raises(checks.ConfigError, match=message.split('=')[0]):
        dataclasses.replace(cls(), **kwargs)


def test_good_values_construct_and_stay_hashable():
    cfg = client.LocalConfig(
        batch_size=64,
        local_epochs=5,
        lr=0.001,
        th_coeff=0.002,
        penalty_warmup=True,
        persistent_optimizer=True,
        drop_last=False,
        collapse_check='previous',
    )
    assert hash(cfg) == hash(dataclasses.replace(cfg))
    assert federated.RoundConfig(importance_update='sampled_before').importance_update == (
        'sampled_before'
    )
    assert client.DataSpec(mean=(0.4, 0.5, 0.6), std=(0.2, 0.2, 0.2)).augment == 'none'


def test_the_run_config_and_the_library_share_one_error_type():
    assert configuration.ConfigError is checks.ConfigError
    assert issubclass(checks.ConfigError, ValueError)
