"""Command line: python -m hybrid_jax.main --config configs/fashion_mnist.py --workdir runs/fmnist [--config.key=value]

Trains (or resumes) the configured model and prints the final summary. Mistakes in
the command (an unknown config key or model, a missing dataset, an image size the
model cannot take, a diverged loss) end with one clear message, not a traceback.
"""

import difflib
import json
import logging
import re
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from hybrid_jax.runtime import compilation_cache, configure_process

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file, e.g. configs/fashion_mnist.py.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots; reruns resume.")
flags.mark_flags_as_required(["config", "workdir"])


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors that mean "fix the command", reported without a traceback."""
    from hybrid_jax.checkpoint import CheckpointError
    from hybrid_jax.data.pipeline import DataError
    from hybrid_jax.train.config import ConfigError
    from hybrid_jax.train.loop import TrainingDiverged

    return ConfigError, DataError, CheckpointError, TrainingDiverged


# --config.model.FIELD=VALUE assignments, set aside by the flag parser for main().
_MODEL_FIELDS: dict[str, str] = {}
_MODEL_FLAG = re.compile(r"--config\.model(\.\w+)?(=.*)?$", re.DOTALL)


def _split_model_flags(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """Takes `--config.model.FIELD=VALUE` out of argv: the loop applies them after the file, name first."""
    rest, fields = [], {}
    args = iter(argv)
    for arg in args:
        match = _MODEL_FLAG.match(arg)
        if not match:
            rest.append(arg)
            continue
        field, value = match.group(1), match.group(2)
        if field is None:
            shown = value[1:] if value else "NAME"
            sys.exit(f"error: config.model is a nested config now: choose the model with --config.model.name={shown} "
                     f"and set its fields with --config.model.FIELD=VALUE")
        fields[field[1:]] = value[1:] if value else next(args, "")
    return rest, fields


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with a bad `--config.key` reported as one line with close matches."""
    argv, model_fields = _split_model_flags(argv)
    _MODEL_FIELDS.update(model_fields)
    sys.argv = argv  # config_flags finds its overrides in sys.argv itself
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError) as error:
        text = str(error).replace("\\n", " ").strip("'\"")
        # The error names the last component of the key it could not find (or whose value it could not parse).
        keys = [key for key in re.findall(r"--config\.([\w.]+)", " ".join(argv)) if key.split(".")[-1] in text]
        if keys:
            from hybrid_jax.train.config import default_config

            key, defaults = keys[0], default_config()
            known = _flatten_keys(defaults.to_dict())
            if key in known:
                value = defaults
                for part in key.split("."):
                    value = value[part]
                given = next(arg for arg in argv if arg.startswith(f"--config.{key}"))
                sys.exit(f"error: {given}: config.{key} takes {type(value).__name__} values, e.g. {value!r}")
            close = difflib.get_close_matches(key, known, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            sys.exit(f"error: unknown config key {key!r} in --config.{key}.{hint}")
        sys.exit(f"error: {text}\nUsage: python -m hybrid_jax.main --config configs/fashion_mnist.py "
                 f"--workdir runs/fmnist [--config.key=value ...]")


def _flatten_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        keys.append(prefix + key)
        if isinstance(value, dict):
            keys += _flatten_keys(value, f"{prefix}{key}.")
    return keys


def main(argv: list[str]) -> None:
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax and tfds narrate every step at INFO
    logging.getLogger("hybrid_jax").setLevel(logging.INFO)
    from hybrid_jax.train.config import set_model_fields
    from hybrid_jax.train.loop import train_and_evaluate

    try:
        config = _CONFIG.value
        set_model_fields(config, _MODEL_FIELDS)
        with compilation_cache(config.compilation_cache_dir):
            summary = train_and_evaluate(config, _WORKDIR.value)
    except _user_errors() as error:
        sys.exit(f"error: {error}")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    configure_process()
    app.run(main, flags_parser=_parse_flags)
