r"""The `spafl-train` command (also `python experiments/main.py`): flags in, one run out.

    spafl-train                                             # embedded default: SpaFL on digits
    spafl-train --config=fmnist.py --config.rounds=20 --workdir=/tmp/fmnist
    spafl-train --config=cifar10.py                         # downloads CIFAR-10 on first use
    spafl-train --config=path/to/my_config.py --config.lr=0.02

A bare config file name resolves to the package's configs (spafl_jax/configs/); a path is used as
it is. The logic lives in `spafl_jax.train`. The flag helpers here are shared by the commands in
experiments/ (compare, ablation) and research/ (tuning), so that every command reports a mistake
the user can fix as one line and exit status 2.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs')


def resolve_config_argument(argv: list[str]) -> list[str]:
    """`--config=cifar10.py[:arg]` -> spafl_jax/configs/cifar10.py when not a path that exists.

    The config file is moved before its `--config.FIELD=VALUE` overrides (ml_collections refuses
    an override that comes first; the overrides apply to the file wherever they are written).
    """
    files_, others = [], []
    for arg in argv[1:]:
        if arg.startswith('--config=') and not arg.startswith('--config.'):
            value = arg[len('--config=') :]
            path, sep, rest = value.partition(':')
            if not os.path.exists(path) and os.path.exists(os.path.join(CONFIG_DIR, path)):
                arg = '--config=' + os.path.join(CONFIG_DIR, path) + sep + rest
            files_.append(arg)
        else:
            others.append(arg)
    return argv[:1] + files_ + others


def exit_with_error(message: str) -> None:
    """The one-line `error: ...` every command prints for a mistake the user can fix; status 2."""
    print(f'error: {message}', file=sys.stderr)
    sys.exit(2)


@contextlib.contextmanager
def reporting_stops():
    """Ends the command with one line, never a traceback, when a run stops for a reason the user
    acts on: a mistake they can fix (status 2), divergence (3), or a signal that stopped it at a
    round boundary with a checkpoint written (128 + the signal, as a shell reports it)."""
    # pylint: disable=g-import-not-at-top
    from spafl_jax import configuration
    from spafl_jax import data as data_lib
    from spafl_jax import train
    # pylint: enable=g-import-not-at-top

    try:
        yield
    except (configuration.ConfigError, data_lib.DatasetUnavailableError, train.WorkdirError) as e:
        exit_with_error(str(e))
    except train.NonFiniteError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(3)
    except train.Preempted as e:
        print(str(e), file=sys.stderr)
        sys.exit(128 + e.signum)


def define_config_flag(default_path: str, help_text: str):
    """`--config` (a config file with `--config.FIELD=VALUE` overrides), as every command has it.

    ml_collections applies overrides while the flag is defined as well as when it is parsed: an
    override of a field the config lacks exits with one line in both places (`parse_flags`).
    """
    from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

    try:
        return config_flags.DEFINE_config_file('config', default_path, help_text, lock_config=True)
    except (AttributeError, KeyError) as e:
        exit_with_error(_unknown_field(e, sys.argv))


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing with every failure as one line and status 2 (`app.run(main,
    flags_parser=parse_flags)`): a config file that is missing or does not parse, its argument,
    unknown fields, values of the wrong type, unknown flags."""
    from absl import flags  # pylint: disable=g-import-not-at-top

    config_arg = next((a for a in argv if a.startswith('--config=')), '--config')
    try:
        rest = flags.FLAGS(argv)
        # Progress goes to stdout (spafl_jax.console); absl's INFO detail (and JAX's, such as
        # its probe for a TPU) only with --verbosity=0. absl.app raises an unset verbosity to
        # INFO after parsing, so it is set here.
        if 'verbosity' in flags.FLAGS and flags.FLAGS['verbosity'].using_default_value:
            flags.FLAGS.verbosity = -1
        if 'config' in flags.FLAGS:
            _ = flags.FLAGS['config'].value.get  # a file that failed to load raises here
        return rest
    except (AttributeError, KeyError) as e:
        if "attribute 'get_config'" in str(e):
            exit_with_error(
                f'{config_arg}: the file defines no get_config(); a config file '
                'returns its ml_collections.ConfigDict from get_config().'
            )
        exit_with_error(_unknown_field(e, argv))
    except SyntaxError as e:
        exit_with_error(f'{config_arg}: {e.msg} at line {e.lineno} of {e.filename}; fix the file.')
    except OSError as e:
        detail = str(e).strip().splitlines()[-1].strip()
        exit_with_error(
            f'{config_arg}: the config file cannot be read ({detail}); give a path, or '
            f'a name in {CONFIG_DIR}.'
        )
    except flags.Error as e:
        exit_with_error(_flag_error_line(str(e)))
    except Exception as e:  # pylint: disable=broad-except  (raised by the config file's own code)
        detail = (str(e).strip().splitlines() or [''])[0]
        exit_with_error(
            f'{config_arg}: get_config() raised {type(e).__name__}: {detail}; fix the file.'
        )
    return []


def _unknown_field(error: Exception, argv: list[str]) -> str:
    field = str(error).strip('"\'')
    override = next(
        (
            a
            for a in argv
            if a.startswith('--config.')
            and a[len('--config.') :].split('=')[0].split('.')[-1] == field
        ),
        f'--config.{field}',
    )
    return (
        f'{override}: the config has no field {field!r}; the fields are those of '
        'spafl_jax/configs/default.py (check the spelling).'
    )


def _flag_error_line(message: str) -> str:
    """absl's message in one line: for a config file whose get_config raised, that exception."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if 'Error whilst parsing config file' in message and len(lines) > 1:
        flag = lines[0].split(':')[0].replace('flag ', '')
        cause = lines[-1].split(': ', 1)[-1]
        return f'{flag}: {cause}'
    if not lines:
        return 'the flags could not be parsed.'
    line = lines[0][len('flag ') :] if lines[0].startswith('flag ') else lines[0]
    for cause, fix in (
        ('invalid literal for int()', 'must be an integer'),
        ('could not convert string to float', 'must be a number'),
    ):
        if cause in line:
            return f'{line.split(": ")[0]}: {fix}.'
    if line.startswith('Unknown command line flag'):
        name = line.split("'")[1] if line.count("'") >= 2 else ''
        return (
            f'{line}; config fields take the --config. prefix (--config.{name}=VALUE), and '
            '--help lists the flags.'
        )
    return line


def _define_runner_flags():
    from absl import flags  # pylint: disable=g-import-not-at-top

    config = define_config_flag(
        os.path.join(CONFIG_DIR, 'default.py'),
        'Config file (a bare name is looked up in '
        'spafl_jax/configs/); override fields with --config.FIELD=VALUE.',
    )
    workdir = flags.DEFINE_string(
        'workdir',
        None,
        'Directory for metrics, figures and checkpoints (default: '
        'runs/<dataset>_<model>_<time>); the same command on the same workdir resumes from its '
        'newest good checkpoint.',
    )
    overwrite = flags.DEFINE_bool(
        'overwrite', False, 'Replace a run with a different config that already lives in --workdir.'
    )
    return config, workdir, overwrite


def _main(argv, config_flag, workdir_flag, overwrite_flag) -> None:
    from absl import app  # pylint: disable=g-import-not-at-top
    from absl import logging  # pylint: disable=g-import-not-at-top

    from spafl_jax import train  # pylint: disable=g-import-not-at-top

    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
    config = config_flag.value
    workdir = workdir_flag.value or os.path.join(
        'runs',
        f'{config.get("dataset", "run")}_{config.get("model", "")}_'
        f'{time.strftime("%Y%m%d-%H%M%S")}',
    )
    with reporting_stops():
        summary = train.train_and_evaluate(config, workdir, overwrite=overwrite_flag.value)
    logging.info(
        'done: accuracy %.2f%%, density %.2f%%, %.2f s per round; results in %s',
        100 * summary['accuracy'],
        100 * summary['density'],
        summary['seconds_per_round'],
        workdir,
    )


def run() -> None:
    """The console entry point: resolves the config name, defines the flags, runs."""
    sys.argv = resolve_config_argument(sys.argv)
    from absl import app  # pylint: disable=g-import-not-at-top

    flags_ = _define_runner_flags()
    app.run(lambda argv: _main(argv, *flags_), flags_parser=parse_flags)


if __name__ == '__main__':
    run()
