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

from hybrid_jax.runtime import configure_process

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


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with a bad `--config.key` reported as one line with close matches."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError) as error:
        text = str(error).replace("\\n", " ").strip("'\"")
        # The error names the last component of the key it could not find.
        keys = [key for key in re.findall(r"--config\.([\w.]+)", " ".join(argv)) if key.split(".")[-1] in text]
        if keys:
            key = keys[0]
            from hybrid_jax.train.config import default_config

            known = [k for k in _flatten_keys(default_config().to_dict())]
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
    from hybrid_jax.train.loop import train_and_evaluate

    try:
        summary = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except _user_errors() as error:
        sys.exit(f"error: {error}")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    configure_process()
    app.run(main, flags_parser=_parse_flags)
