"""hybrid_jax.export: serialised models with a symbolic batch equal the Python model; the command and its errors."""

import jax
import numpy as np
import pytest

from hybrid_jax import create_model
from hybrid_jax.checkpoint import Checkpointer
from hybrid_jax.export import export_model, load, main, save
from test_nnx import FAMILIES, NUM_CLASSES, batch_shape, host_variables, images


def round_trip(name: str, tmp_path, batches=(1, 3)):
    """Exports `name` with host-drawn weights, writes and reads it back, and compares it with the model."""
    module = create_model(name, num_classes=NUM_CLASSES)
    image_shape = batch_shape(name)[1:]
    variables = host_variables(module, (1, *image_shape))
    assert save(export_model(module, variables, image_shape), tmp_path / "model.jaxexport") > 0
    exported = load(tmp_path / "model.jaxexport")
    assert str(exported.in_avals[0].shape[0]) == "b"
    apply = jax.jit(lambda x: module.apply(variables, x, train=False))
    for batch in batches:
        x = images((batch, *image_shape), seed=batch)
        logits = exported.call(x)
        assert logits.shape == (batch, NUM_CLASSES)
        np.testing.assert_allclose(logits, apply(x), rtol=1e-5, atol=1e-5)


# BatchNorm in a CNN, and attention.
@pytest.mark.parametrize("name", ["test_resnet", "test_vit"])
def test_round_trip_equals_the_model_at_two_batch_sizes(name, tmp_path):
    round_trip(name, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(FAMILIES.values()) - {"test_resnet", "test_vit"}))
def test_every_family_round_trips(name, tmp_path):
    round_trip(name, tmp_path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run's workdir with two checkpoints of test_resnet (5 classes), and the variables of each."""
    workdir = tmp_path_factory.mktemp("run")
    module = create_model("test_resnet", num_classes=NUM_CLASSES)
    steps = {3: host_variables(module, (1, 32, 32, 3), seed=3), 4: host_variables(module, (1, 32, 32, 3), seed=4)}
    checkpointer = Checkpointer(workdir / "checkpoints", async_save=False)
    for step, variables in steps.items():
        # As the training loop saves it: the train state, the data position, the config.
        checkpointer.save(step, {"step": step, **variables}, {"position": step}, {"model": {"name": "test_resnet"}})
    checkpointer.close()
    return workdir, module, steps


@pytest.mark.parametrize("which", ["workdir", "step"])
def test_command_exports_a_checkpoint(run, which, tmp_path, capsys):
    workdir, module, steps = run
    checkpoint, step = (workdir, 4) if which == "workdir" else (workdir / "checkpoints" / "3", 3)
    out = tmp_path / "resnet.jaxexport"
    main(["--model", "test_resnet", "--num_classes", str(NUM_CLASSES), "--checkpoint", str(checkpoint),
          "--out", str(out)])
    assert f"step {step} of" in capsys.readouterr().out
    x = images((2, 32, 32, 3))
    np.testing.assert_allclose(load(out).call(x), module.apply(steps[step], x, train=False), rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # a random initialisation compiles for ~10 s here
def test_command_without_weights_exports_a_random_init_and_says_so(tmp_path, capsys):
    out = tmp_path / "vit.jaxexport"
    main(["--model", "test_vit", "--out", str(out)])
    assert "with random weights" in capsys.readouterr().err
    logits = load(out).call(images((2, 32, 32, 3)))
    assert logits.shape == (2, 10) and np.all(np.isfinite(logits))


@pytest.mark.parametrize("args, message", [
    ("--model test_resnt --out OUT", "unknown model 'test_resnt'. Did you mean: test_resnet"),
    ("--model test_resnet --checkpoint /nonexistent/run --out OUT", "is not a directory"),
    ("--model test_resnet --checkpoint a --pretrained b --out OUT", "not allowed with argument"),
    ("--model test_resnet --ema --out OUT", "--ema needs --checkpoint"),
    ("--model test_resnet --num_classes -1 --out OUT", "give 0 (pooled features) or more"),
    ("--model test_resnet", "the following arguments are required: --out"),
])
def test_bad_input_is_one_line(args, message, tmp_path):
    out = tmp_path / "model.jaxexport"
    with pytest.raises(SystemExit) as exit_info:
        main(args.replace("OUT", str(out)).split())
    error = str(exit_info.value.code)
    assert message in error and "\n" not in error, error
    assert not out.exists()


def test_checkpoint_of_another_model_says_what_differs(run, tmp_path):
    workdir, _, _ = run
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "test_resnet", "--checkpoint", str(workdir), "--out", str(tmp_path / "x")])
    error = str(exit_info.value.code)  # test_resnet's own head has 10 classes; the run's has 5
    assert "params/head/kernel (32, 5) -> (32, 10)" in error and "--num_classes" in error, error
    assert "\n" not in error
