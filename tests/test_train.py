"""The training system: sharded steps equal single-device ones, exact resume, damaged checkpoints, the CLI."""

import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from hybrid_jax import create_model, list_models, model_info
from hybrid_jax.checkpoint import Checkpointer, CheckpointError, CheckpointMismatch
from hybrid_jax.data.augment import AugmentConfig
from hybrid_jax.data.pipeline import get_builder
from hybrid_jax.metrics import read_metrics
from hybrid_jax.parallel.mesh import make_mesh
from hybrid_jax.parallel.rules import DEFAULT_RULES
from hybrid_jax.train.config import ConfigError, check_keys, check_values, default_config, model_config
from hybrid_jax.train.loop import build_run, train_and_evaluate
from hybrid_jax.train.optim import decay_mask, make_optimizer
from hybrid_jax.train.state import create_train_state
from hybrid_jax.train.step import classification_loss, train_step

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "fashion_mnist.py")


@pytest.fixture(scope="session")
def fmnist_dir(tmp_path_factory) -> str:
    """A tfds data dir with the real Fashion-MNIST prepared once from the Debian files."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    get_builder("fashion_mnist", data_dir)
    return data_dir


def _config(data_dir: str, **overrides):
    config = default_config()
    config.update(dict(model=model_config("test_resnet"), data_dir=data_dir, batch_size=32, eval_batch_size=1000,
                       total_steps=20, warmup_steps=2, log_every=5, checkpoint_every=10, progress_bar=False,
                       async_checkpoint=False, eval_split="test[:1000]"))
    if "model" in overrides:  # ConfigDict.update would merge the two models' fields
        config.model = overrides.pop("model")
    config.update(overrides)
    return config


# --------------------------------------------------------------------------- #
# The step on any mesh
# --------------------------------------------------------------------------- #


def _train_on_mesh(model_name: str, mesh_shape, devices, steps: int = 3, optimizer: str = "sgd"):
    """Losses and final state of a few steps; SGD by default, because Adam divides a near-zero gradient's
    rounding noise by its own size (e.g. the key bias, which softmax makes gradient-free) and so moves
    such weights by +-lr on any change of reduction order, sharded or not."""
    config = default_config()
    config.update(dict(warmup_steps=1, learning_rate=1e-2, optimizer=optimizer))
    model = create_model(model_name, num_classes=10)
    size = model_info(model_name).input_size
    tx, schedule = make_optimizer(config, 10)
    mesh = make_mesh(mesh_shape, devices=devices)
    state, shardings = create_train_state(model, tx, (size, size, 3), seed=0, use_ema=True, mesh=mesh,
                                          rules=DEFAULT_RULES)
    batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    step = jax.jit(functools.partial(train_step, model=model, tx=tx, schedule=schedule, augment=AugmentConfig(),
                                     num_classes=10, label_smoothing=0.1, ema_decay=0.9, grad_accum_steps=1),
                   in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None))
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(steps):
        batch = {"image": rng.integers(0, 256, (16, size, size, 3), dtype=np.uint8),
                 "label": rng.integers(0, 10, (16,), dtype=np.int32)}
        state, metrics = step(state, jax.device_put(batch, batch_sharding))
        losses.append(float(metrics["loss"]))
    return losses, state


def _check_mesh_matches_one_device(model_name: str, mesh_shape, param_atol: float = 1e-5,
                                   loss_rtol: float = 1e-5, param_rtol: float = 1e-5) -> None:
    one_losses, one_state = _train_on_mesh(model_name, (1, 1, 1), jax.devices()[:1])
    losses, state = _train_on_mesh(model_name, mesh_shape, jax.devices())
    np.testing.assert_allclose(losses, one_losses, rtol=loss_rtol)
    assert losses[-1] != losses[0]  # the model did learn something in between
    for tree, one_tree in [(state.params, one_state.params), (state.ema_params, one_state.ema_params),
                           (state.batch_stats, one_state.batch_stats)]:
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=param_atol, rtol=param_rtol), tree, one_tree)


@pytest.mark.parametrize("model_name", ["test_vit", "test_resnet"])
@pytest.mark.parametrize("mesh_shape", [(4, 2, 1), (2, 1, 4)])
def test_sharded_steps_equal_one_device(model_name, mesh_shape):
    _check_mesh_matches_one_device(model_name, mesh_shape)


@pytest.mark.parametrize("model_name, mesh_shape", [
    ("parallel_hybrid_tiny", (2, 1, 4)), ("mobile_former_tiny_32", (2, 1, 4)),
    # 100-160 s each on 2 cores, through the same fusion and sharding code as the two above: -m slow.
    pytest.param("tccnet_tiny", (4, 2, 1), marks=pytest.mark.slow),
    pytest.param("conformer_tiny_32", (4, 2, 1), marks=pytest.mark.slow)])
def test_parallel_hybrids_train_on_a_mesh_like_on_one_device(model_name, mesh_shape):
    """Losses to 3e-5, parameters and batch statistics to 3e-4 + 1e-4 relative. Each step moves a weight
    by about lr * |grad| ~ 1e-2, so a wrong gradient shows at 1e-2, while reduction-order rounding
    through Conformer's two branches reaches, in three steps, 1.3e-4 on its stem kernel, 7.9e-5
    relative on a running variance and 1.05e-5 on its third loss (it varies run to run) with XLA's CPU
    convolutions, whose summation order follows the per-device batch."""
    _check_mesh_matches_one_device(model_name, mesh_shape, param_atol=3e-4, loss_rtol=3e-5, param_rtol=1e-4)


SERIAL_AND_HIERARCHICAL = [name for name in list_models("test_*")
                           if model_info(name).category in ("serial", "hierarchical")]
# In the default run: one family of each kind of layer (convolution stages before attention, windowed and grid
# attention, unfold-fold attention, a CNN backbone under a ViT); the other six under -m slow, for CI's time.
MESH_DEFAULT = ("test_coatnet", "test_maxvit", "test_mobilevit", "test_vit_r50")


@pytest.mark.parametrize("model_name", [
    name if name in MESH_DEFAULT else pytest.param(name, marks=pytest.mark.slow) for name in SERIAL_AND_HIERARCHICAL])
def test_serial_and_hierarchical_hybrids_train_on_a_mesh_like_on_one_device(model_name):
    """One small model per family, on a data x fsdp mesh or a data x tensor one, in turn (not all three axes > 1:
    see test_xla_three_axis_mesh_gradient_bug)."""
    mesh_shape = (4, 2, 1) if SERIAL_AND_HIERARCHICAL.index(model_name) % 2 else (2, 1, 4)
    _check_mesh_matches_one_device(model_name, mesh_shape, param_atol=1e-4)


def test_parameters_are_sharded_as_the_rules_say():
    _, state = _train_on_mesh("test_vit", (2, 2, 2), jax.devices(), steps=1, optimizer="adamw")
    kernel = state.params["blocks_0"]["mlp"]["fc1"]["kernel"]
    assert kernel.sharding.spec == PartitionSpec("fsdp", "tensor")
    assert kernel.addressable_shards[0].data.shape == (16, 64)
    mu = state.opt_state[1][0].mu["blocks_0"]["mlp"]["fc1"]["kernel"]  # adam moments follow their parameter
    assert mu.sharding.spec == PartitionSpec("fsdp", "tensor")


def test_the_loops_train_step_constrains_activations_on_a_mesh_and_equals_one_device(fmnist_dir):
    """The step `train_and_evaluate` runs, built by the loop itself: traced under the mesh's logical rules."""
    config = _config(fmnist_dir, model=model_config("test_vit"), mesh_shape=(2, 2, 2), optimizer="sgd",
                     learning_rate=1e-2, warmup_steps=1, batch_size=16)
    run = build_run(config)
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (16, 28, 28, 1), dtype=np.uint8),
             "label": rng.integers(0, 10, (16,), dtype=np.int32)}
    program = run.train_step.lower(run.abstract_state, run.placement.global_batch(batch)).as_text()
    # Each of the 2 blocks constrains its tokens (batch, length, embed) to (('data', 'fsdp'), -, 'tensor'),
    # forward and backward; without the rules in scope the program carries no constraint at all.
    constraints = re.findall(r"sharding_constraint .*<@mesh, (.*)> : tensor<16x50x32xf32>", program)
    assert constraints == ['[{"data", "fsdp"}, {}, {"tensor"}]'] * 4, constraints

    state = run.build_state()
    one_state, one_metrics = jax.jit(run.train_step.fn)(jax.device_get(state), batch)
    state, metrics = run.train_step(state, run.placement.global_batch(batch))
    np.testing.assert_allclose(metrics["loss"], one_metrics["loss"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), state.params, one_state.params)


def test_the_loops_grad_norm_leaves_frozen_parameters_out(fmnist_dir):
    """With all but the head frozen, the logged gradient norm is the head's: plain SGD at a constant rate moves
    the head by exactly rate x gradient, so the norm is read back from the update itself."""
    rate = 0.1
    config = _config(fmnist_dir, optimizer="sgd", momentum=0.0, weight_decay=0.0, clip_norm=0.0, warmup_steps=0,
                     learning_rate=rate, min_learning_rate=rate, batch_size=16, freeze=("^(?!head/)",))
    run = build_run(config)
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (16, 28, 28, 1), dtype=np.uint8),
             "label": rng.integers(0, 10, (16,), dtype=np.int32)}
    state = run.build_state()
    before = jax.device_get(state.params)  # read before the step donates the state
    state, metrics = run.train_step(state, run.placement.global_batch(batch))
    moved = jax.tree.map(np.subtract, jax.device_get(state.params), before)
    head_step = moved.pop("head")
    assert optax.tree.norm(head_step) > 0 and max(np.abs(leaf).max() for leaf in jax.tree.leaves(moved)) == 0
    np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(head_step) / rate, rtol=1e-4)


def test_gradient_accumulation_matches_one_big_batch():
    """Two accumulated micro-batches of 16 make the same update as their mean gradient (SGD, no EMA)."""
    config = default_config()
    config.update(dict(optimizer="sgd", momentum=0.0, weight_decay=0.0, clip_norm=0.0, warmup_steps=0,
                       learning_rate=0.1, min_learning_rate=0.1, grad_accum_steps=2))
    model = create_model("test_vit", num_classes=10)
    images = jax.random.uniform(jax.random.key(0), (2, 8, 32, 32, 3))
    labels = jax.nn.one_hot(jnp.arange(16).reshape(2, 8) % 10, 10)
    params = model.init(jax.random.key(1), images[0], train=False)["params"]
    loss = lambda p, x, y: optax.softmax_cross_entropy(model.apply({"params": p}, x, train=False), y).mean()
    tx, _ = make_optimizer(config, 10)
    opt_state = tx.init(params)
    accumulated = params
    for x, y in zip(images, labels):
        updates, opt_state = tx.update(jax.grad(loss)(accumulated, x, y), opt_state, accumulated)
        accumulated = optax.apply_updates(accumulated, updates)
    mean_grad = jax.tree.map(lambda a, b: (a + b) / 2, jax.grad(loss)(params, images[0], labels[0]),
                             jax.grad(loss)(params, images[1], labels[1]))
    expected = jax.tree.map(lambda p, g: p - 0.1 * g, params, mean_grad)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), accumulated, expected)


def test_weight_decay_skips_biases_norms_and_embeddings():
    variables = create_model("test_vit").init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    params = nn.meta.unbox(variables["params"])
    mask = decay_mask(params)
    assert mask["blocks_0"]["mlp"]["fc1"]["kernel"] and mask["patch_embed"]["proj"]["kernel"]
    assert not mask["blocks_0"]["mlp"]["fc1"]["bias"] and not mask["norm"]["scale"]
    assert not mask["pos_embed"] and not mask["cls_token"]


def test_head_losses_train_each_head_or_their_mean():
    heads = {"cnn": jnp.array([[4.0, 0.0]]), "transformer": jnp.array([[-2.0, 0.0]])}
    targets = jnp.array([[1.0, 0.0]])
    ce = lambda z: float(jnp.log1p(jnp.exp(-z)))  # cross-entropy of class 0 at logit margin z
    # Each head alone: the transformer head is wrong and pays for it...
    np.testing.assert_allclose(classification_loss(heads, targets, "each"), ce(4.0) + ce(-2.0), rtol=1e-6)
    # ...the mean (margin 1) is right, and only it is judged.
    np.testing.assert_allclose(classification_loss(heads, targets, "mean"), ce(1.0), rtol=1e-6)
    single = {"logits": heads["cnn"]}
    assert classification_loss(single, targets, "each") == classification_loss(single, targets, "mean")
    config = default_config()
    config.head_loss = "average"
    with pytest.raises(ConfigError, match="head_loss='average'; choose one of"):
        check_values(config)


def test_unknown_config_key_names_close_matches():
    config = default_config()
    config.learnig_rate = 0.1
    with pytest.raises(ConfigError, match="did you mean learning_rate|Did you mean learning_rate"):
        check_keys(config)
    config = default_config()
    config.augment.mixup = 0.2
    with pytest.raises(ConfigError, match="augment.mixup_alpha"):
        check_keys(config)


# --------------------------------------------------------------------------- #
# The loop on real data
# --------------------------------------------------------------------------- #


def _final_params(workdir: Path, step: int):
    restored = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
    return restored["params"]


def test_damaged_latest_checkpoint_falls_back_to_the_previous(fmnist_dir, tmp_path, caplog):
    train_and_evaluate(_config(fmnist_dir), tmp_path)
    # Truncate every array-data file of the newest checkpoint: OCDBT keeps several, some unreferenced.
    data_files = [p for p in (tmp_path / "checkpoints" / "20" / "state").rglob("*") if p.parent.name == "d"]
    assert data_files
    for path in data_files:
        with path.open("r+b") as f:
            f.truncate(path.stat().st_size // 2)
    summary = train_and_evaluate(_config(fmnist_dir, total_steps=30, resume_changes=("total_steps",)), tmp_path)
    assert "cannot be read" in caplog.text and "step 20" in caplog.text
    assert (tmp_path / "checkpoints_unreadable" / "20").is_dir()  # set aside, not deleted
    steps = [r["step"] for r in read_metrics(tmp_path) if r["split"] == "train"]
    assert steps == [5, 10, 15, 20, 25, 30]  # resumed from step 10; the lost steps' records were rewound
    assert summary["steps"] == 30

    # Analysis reads the newest step's weights without the optimizer; the run kept no EMA to give.
    checkpointer = Checkpointer(tmp_path / "checkpoints", async_save=False)
    step, variables = checkpointer.restore_variables()
    assert step == 30 and set(variables) == {"params", "batch_stats"}
    jax.tree.map(np.testing.assert_array_equal, variables["params"], _final_params(tmp_path, 30))
    with pytest.raises(CheckpointError, match="no parameter EMA.*ema_decay"):
        checkpointer.restore_variables(ema=True)
    checkpointer.close()


def test_a_changed_config_stops_the_resume_and_leaves_the_checkpoint(fmnist_dir, tmp_path):
    train_and_evaluate(_config(fmnist_dir, total_steps=10), tmp_path)
    saved = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    # A new field value: named with both values and the ways on.
    with pytest.raises(CheckpointMismatch, match=r"another config \(ema_decay 0.0 -> 0.999\).*"
                                                 r"new workdir.*--config.resume_changes=ema_decay"):
        train_and_evaluate(_config(fmnist_dir, total_steps=10, ema_decay=0.999), tmp_path)
    # Allowing it is not enough when the state itself changes shape (an EMA tree appears).
    with pytest.raises(CheckpointMismatch, match="another state structure.*not in the checkpoint: ema_"):
        train_and_evaluate(_config(fmnist_dir, total_steps=10, ema_decay=0.999, resume_changes=("ema_decay",)),
                           tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == saved
    assert not (tmp_path / "checkpoints_unreadable").exists()
    # A checkpoint older than a field (here remat) resumes while the field keeps its default, not otherwise.
    saved_config = tmp_path / "checkpoints" / "10" / "config" / "metadata"
    older = json.loads(saved_config.read_text())
    del older["remat"]
    saved_config.write_text(json.dumps(older))
    with pytest.raises(CheckpointMismatch, match=r"another config \(remat '<absent>' -> 'full'\)"):
        train_and_evaluate(_config(fmnist_dir, total_steps=10, remat="full"), tmp_path)
    # A longer schedule, allowed, resumes from step 10.
    summary = train_and_evaluate(_config(fmnist_dir, total_steps=15, resume_changes=("total_steps",)), tmp_path)
    assert summary["steps"] == 15
    assert [r["step"] for r in read_metrics(tmp_path) if r["split"] == "train"] == [5, 10, 15]


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(fmnist_dir, tmp_path):
    from hybrid_jax.train.loop import TrainingDiverged

    # Warmup makes the first update a no-op (lr 0), so there is one good step to checkpoint.
    config = _config(fmnist_dir, learning_rate=1e30, clip_norm=0.0, warmup_steps=3, log_every=1,
                     checkpoint_every=1, label_smoothing=0.0)
    with pytest.raises(TrainingDiverged, match=r"at step \d+") as error:
        train_and_evaluate(config, tmp_path)
    bad_step = int(re.search(r"at step (\d+)", str(error.value)).group(1))
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and saved[-1] == bad_step - 1
    params = _final_params(tmp_path, saved[-1])
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


def _cli(workdir: Path, data_dir: str, *args: str, env: dict | None = None, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "hybrid_jax.main", f"--config={CONFIG}:smoke", f"--workdir={workdir}",
         f"--config.data_dir={data_dir}", "--config.progress_bar=False", *args],
        cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        **popen)


def _run_cli(workdir: Path, data_dir: str, *args: str, env: dict | None = None, timeout: int = 300):
    process = _cli(workdir, data_dir, *args, env=env)
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def test_cli_trains_on_fashion_mnist_and_writes_its_outputs(fmnist_dir, tmp_path):
    cache = tmp_path / "jax_cache"
    code, out, err = _run_cli(tmp_path, fmnist_dir, "--config.model.stem_width=12", "--config.profile_steps=(2,3)",
                              f"--config.compilation_cache_dir={cache}")
    assert code == 0, err
    summary = json.loads(out[out.index("{"):])
    assert summary["steps"] == 30 and summary["test_accuracy"] > 0.2  # ten classes: chance is 0.1
    assert summary["model"] == "test_resnet" and summary["task"] == "classification"
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model"]["stem_width"] == 12 and saved["model"]["widths"] == [8, 16, 16, 32]
    assert list((tmp_path / "profile").glob("plugins/profile/*/*.xplane.pb"))  # the trace of steps 2-3
    assert any(cache.iterdir())  # compiled programs kept for the next run
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records if r["split"] == "train"] == [10, 20, 30]
    assert {"loss", "accuracy", "grad_norm", "learning_rate", "images_per_sec"} <= records[0].keys()
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    assert (tmp_path / "checkpoints" / "30").is_dir() and list((tmp_path / "tensorboard").iterdir())


def test_cli_fine_tunes_timm_weights_with_a_new_head_then_scores_them_in_eval_mode(fmnist_dir, tmp_path):
    """timm's ResNet-18 (random weights, BatchNorm statistics randomised) saved as a user would, fine-tuned with all
    but the new head frozen: the frozen weights end as they started, the checkpoint's converted values."""
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    from hybrid_jax.convert import convert_state_dict
    from parity import randomize_norms_

    reference = randomize_norms_(timm.create_model("resnet18", num_classes=1000))
    weights = tmp_path / "resnet18.safetensors"
    save_file(reference.state_dict(), str(weights))
    finetune = [sys.executable, "-m", "hybrid_jax.main",
                f"--config={ROOT / 'configs' / 'fashion_mnist_finetune.py'}:smoke",
                f"--config.data_dir={fmnist_dir}", "--config.progress_bar=False"]
    result = subprocess.run([*finetune, f"--workdir={tmp_path / 'ft'}", f"--config.init_from={weights}",
                             "--config.freeze=('^(?!head/)',)", "--config.learning_rate=1e-2"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "initialised afresh" in result.stderr and "head/kernel" in result.stderr
    losses = [r["loss"] for r in read_metrics(tmp_path / "ft") if r["split"] == "train"]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.05, losses  # the new head learns

    expected = convert_state_dict("resnet18", {k: v.detach().numpy() for k, v in reference.state_dict().items()},
                                  create_model("resnet18", num_classes=10), fit=True)["params"]
    expected["stem"]["conv"]["kernel"] = expected["stem"]["conv"]["kernel"].sum(axis=2, keepdims=True)  # grey input
    checkpointer = Checkpointer(tmp_path / "ft" / "checkpoints", async_save=False)
    step, trained = checkpointer.restore_variables()
    checkpointer.close()
    assert step == 20
    head = trained["params"].pop("head")
    assert np.abs(head["kernel"]).max() > 0  # started at zero, trained
    expected.pop("head")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), trained["params"], expected)

    evaluation = subprocess.run([*finetune, f"--workdir={tmp_path / 'eval'}", "--config.mode=eval",
                                 f"--config.init_from={tmp_path / 'ft'}"], cwd=ROOT, capture_output=True, text=True,
                                timeout=600)
    assert evaluation.returncode == 0, evaluation.stderr
    scored = json.loads((tmp_path / "eval" / "summary.json").read_text())
    trained_summary = json.loads((tmp_path / "ft" / "summary.json").read_text())
    assert scored["mode"] == "eval" and scored["test_accuracy"] == trained_summary["test_accuracy"]


def test_cli_trains_into_a_gs_workdir_and_resumes_from_it(fmnist_dir, tmp_path):
    """A gs:// workdir through the command line, against a fake GCS (tests/fake_gcs.py): orbax's arrays go through
    tensorstore's GCS driver; metrics, summary, plot and TensorBoard events through etils.epath."""
    import fake_gcs

    steps = ["--config.total_steps=20", "--config.checkpoint_every=10"]
    command = [sys.executable, str(ROOT / "tests" / "fake_gcs.py"), f"--config={CONFIG}:smoke",
               "--workdir=gs://bucket/run", f"--config.data_dir={fmnist_dir}", "--config.progress_bar=False"]
    with fake_gcs.serve(tmp_path) as environ:
        run = lambda *args: subprocess.run([*command, *args], cwd=tmp_path, env={**os.environ, **environ},
                                           capture_output=True, text=True, timeout=300)
        first = run(*steps)
        assert first.returncode == 0, first.stderr
        stored = tmp_path / "gs:" / "bucket" / "run"
        assert (stored / "checkpoints" / "20" / "commit_success.txt").is_file()  # orbax took its GCS path
        longer = run("--config.total_steps=30", "--config.checkpoint_every=10", "--config.resume_changes=total_steps")
        assert longer.returncode == 0, longer.stderr
    summary = json.loads((stored / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["test_accuracy"] > 0.2
    records = [json.loads(line) for line in (stored / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [10, 20, 30]  # resumed from step 20
    assert (stored / "curves.png").stat().st_size > 10_000 and list((stored / "tensorboard").iterdir())


@pytest.mark.parametrize("args, env, message", [
    (["--config.learnin_rate=0.1"], {}, "unknown config key 'learnin_rate'.*Did you mean learning_rate"),
    (["--config.model.name=resnet_18"], {}, "unknown model 'resnet_18'. Did you mean: resnet18"),
    (["--config.model.name=vit_tiny_patch16_224"], {}, "cannot take images of shape \\(28, 28, 1\\).*config.resize"),
    (["--config.model=resnet18"], {}, "config.model is a nested config now: .*--config.model.name=resnet18"),
    (["--config.model.depht=3"], {}, "model 'test_resnet' has no field 'depht'"),
    (["--config.model.stem_width=wide"], {}, "--config.model.stem_width=wide: stem_width takes int values"),
    (["--config.batch_size=abc"], {}, "--config.batch_size=abc: config.batch_size takes int values"),
    (["--config.mesh_shape=(3,1,1)"], {}, "config.mesh_shape=\\(3, 1, 1\\): mesh sizes \\[3, 1, 1\\] need 3 devices"),
    (["--config.model_overrides=depth=3"], {}, "unknown config key 'model_overrides'"),
    (["--config.dataset=cifar11"], {}, "Unknown dataset 'cifar11'"),
    ([], {"HYBRID_JAX_FASHION_MNIST_DIR": "/nonexistent"}, "apt-get install dataset-fashion-mnist"),
])
def test_cli_bad_input_gives_one_clear_message(fmnist_dir, tmp_path, args, env, message):

    # The missing-dataset case needs an unprepared data dir, so that the build is attempted.
    data_dir = str(tmp_path / "fresh_tfds") if env else fmnist_dir
    code, _, err = _run_cli(tmp_path / "run", data_dir, *args, env=env)
    assert code != 0
    assert re.search(message, err), err
    assert "Traceback" not in err


def test_cli_nan_loss_is_one_clear_message(fmnist_dir, tmp_path):
    code, _, err = _run_cli(tmp_path, fmnist_dir, "--config.learning_rate=1e30", "--config.clip_norm=0",
                            "--config.warmup_steps=0", "--config.log_every=1")
    assert code != 0 and "Traceback" not in err
    assert "training diverged at step" in err


def _wait_for_checkpoint(workdir: Path, process: subprocess.Popen, timeout: float = 180) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = [int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()]
        if steps:
            return max(steps)
        assert process.poll() is None, process.communicate()[1]
        time.sleep(0.05)
    raise TimeoutError("no checkpoint appeared")


def test_resume_after_sigkill_and_sigterm_is_bit_identical(fmnist_dir, tmp_path):
    steps = ["--config.total_steps=120", "--config.checkpoint_every=10", "--config.log_every=1",
             "--config.eval_every=1000", "--config.async_checkpoint=False"]
    code, _, err = _run_cli(tmp_path / "straight", fmnist_dir, *steps)
    assert code == 0, err

    interrupted = tmp_path / "interrupted"
    process = _cli(interrupted, fmnist_dir, *steps)
    killed_after = _wait_for_checkpoint(interrupted, process)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL and killed_after < 120

    process = _cli(interrupted, fmnist_dir, *steps)  # resumes, then is asked to stop politely
    while max(int(p.name) for p in (interrupted / "checkpoints").glob("*") if p.name.isdigit()) <= killed_after:
        assert process.poll() is None
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 0 and "stopped at step" in err, err

    code, _, err = _run_cli(interrupted, fmnist_dir, *steps)
    assert code == 0, err
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), _final_params(interrupted, 120),
                 _final_params(tmp_path / "straight", 120))
    # Same data order: every step's loss after each resume equals the uninterrupted run's.
    straight = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "straight") if r["split"] == "train"}
    resumed = [(r["step"], r["loss"]) for r in read_metrics(interrupted) if r["split"] == "train"]
    assert len({s for s, _ in resumed}) == 120
    assert all(loss == straight[s] for s, loss in resumed)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one_and_one_process_resumes_them(fmnist_dir, tmp_path):
    steps = ["--config.total_steps=12", "--config.log_every=1", "--config.checkpoint_every=6",
             "--config.eval_every=1000"]
    four_devices = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    code, _, err = _run_cli(tmp_path / "one", fmnist_dir, *steps,
                            env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert code == 0, err
    address = f"localhost:{_free_port()}"
    processes = [_cli(tmp_path / "two", fmnist_dir, *steps, "--config.distributed=True",
                      f"--config.coordinator_address={address}", "--config.num_processes=2",
                      f"--config.process_id={i}", env=four_devices) for i in range(2)]
    for process in processes:
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
    one = [r["loss"] for r in read_metrics(tmp_path / "one") if r["split"] == "train"]
    two = [r["loss"] for r in read_metrics(tmp_path / "two") if r["split"] == "train"]
    assert len(one) == 12
    # Equal to float32 rounding; gloo's cross-process sum rounds otherwise, which Adam amplifies after ~8 steps.
    np.testing.assert_allclose(two[:8], one[:8], rtol=1e-5)
    np.testing.assert_allclose(two, one, rtol=2e-3)

    # Elastic restart: the two processes' step-6 checkpoint, resumed by one process on 4 devices, continues
    # with the same global batches (another batch would move a loss by 1e-2, not 1e-5).
    shutil.rmtree(tmp_path / "two" / "checkpoints" / "12")
    code, _, err = _run_cli(tmp_path / "two", fmnist_dir, *steps, env=four_devices)
    assert code == 0, err
    resumed = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "two") if r["split"] == "train"]
    assert [step for step, _ in resumed] == list(range(1, 13))
    np.testing.assert_allclose([loss for _, loss in resumed][:8], one[:8], rtol=1e-5)
    np.testing.assert_allclose([loss for _, loss in resumed], one, rtol=2e-3)


def test_a_checkpoint_restores_onto_another_mesh(fmnist_dir, tmp_path):
    train_and_evaluate(_config(fmnist_dir, total_steps=10), tmp_path)  # on the (8, 1, 1) mesh
    saved = Checkpointer(tmp_path / "checkpoints", async_save=False).restore_variables()[1]["params"]
    run = build_run(_config(fmnist_dir, total_steps=10, mesh_shape=(2, 2, 2)))
    checkpointer = Checkpointer(tmp_path / "checkpoints", async_save=False)
    step, state, data_position = checkpointer.restore_latest(run.abstract_state, run.config)
    checkpointer.close()
    assert step == 10 and state.step == 10
    head = state.params["head"]["kernel"]
    assert head.sharding.mesh.shape == {"data": 2, "fsdp": 2, "tensor": 2}
    assert head.sharding.spec == PartitionSpec("fsdp", "tensor") and head.addressable_shards[0].data.shape[0] == 16
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), saved)


@pytest.mark.parametrize("path, arg", [
    ("fashion_mnist", ""), ("fashion_mnist", "smoke"), ("fashion_mnist_finetune", ""), ("cifar10", ""),
    ("cifar10", "cifar100"), ("imagenet2012", "vit_base_r50_s16_224")])
def test_every_config_loads_and_names_a_registered_model(path, arg):
    from hybrid_jax.tasks import check_config
    from hybrid_jax.train.config import build_model, load_config_file, model_changes

    config = load_config_file(f"{ROOT / 'configs' / path}.py:{arg}")
    check_config(config)
    name, changes = model_changes(config.model)
    assert type(build_model(config.model, num_classes=10)) is model_info(name).module
