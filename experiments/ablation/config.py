"""The matched-compute ablation sweep: five integration patterns, six fusions, three seeds, two data sizes.

python -m experiments.ablation.run --config experiments/ablation/config.py --workdir runs/ablation
python -m experiments.ablation.run --config experiments/ablation/config.py:tiny --workdir /tmp/ablation_tiny

Every model is scaled to `budget_gmacs` (within `tolerance`) by the width/depth
solver; each (model, train fraction, seed) is one `train_and_evaluate` run in
{workdir}/data{percent}/{model}_{fusion}_seed{k}, then scored on corrupted copies of
the test split. Any training key can be changed from the command line under
`train.`, e.g. `--config.train.learning_rate=1e-3`.

Sizing the default to about an hour on the project's 2-core CPU machine: 10 models x 2 train
fractions x 3 seeds = 60 runs of 200 steps at batch 128 (25,600 images, 0.43 epoch of the full set)
on Fashion-MNIST resized to 32 px, every model at 0.003 GMACs. The tiny models are bound by per-op
overhead on a CPU, not by their multiply-adds: steady training ran at 260-1,750 img/s depending on
the pattern, so a run takes 20-110 s plus its evaluations, and one compilation per model and run
kind (the persistent compilation cache lets the other seeds and train fractions reuse it).
"""

import ml_collections

from experiments.ablation.shift import CORRUPTIONS
from experiments.ablation.solver import FUSIONS, PATTERNS
from hybrid_jax.train.config import default_config


def train_config() -> ml_collections.ConfigDict:
    """The training recipe every run shares: configs/fashion_mnist.py's, at 32 px, one epoch, no progress bar."""
    c = default_config()
    c.dataset = "fashion_mnist"
    # 32 px: every family's stages then halve evenly (MaxViT's windows, CoAtNet's stages, the 8 x 8 token grid).
    c.resize = (32, 32)
    c.batch_size = 128
    c.eval_batch_size = 500
    c.total_steps = 200  # 25,600 images, 0.43 epoch of the full set: the hour's budget (see the module docstring)
    c.optimizer = "adamw"
    c.learning_rate = 2e-3
    c.warmup_steps = 50
    c.weight_decay = 0.05
    c.label_smoothing = 0.1
    c.augment.flip = True
    c.augment.mean = (0.286,)  # Fashion-MNIST pixel statistics
    c.augment.std = (0.353,)
    c.eval_every = 10**9  # evaluate once, after the last step (a 10% run would otherwise evaluate every epoch)
    c.log_every = 50
    c.checkpoint_every = 100
    c.progress_bar = False
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """`arg`: "" the real sweep (about an hour on 2 CPU cores); "tiny" a seconds-long run of the whole engine."""
    c = ml_collections.ConfigDict()
    c.budget_gmacs = 0.003  # multiply-adds per 32 px image, billions (6 MFLOPs); every model is solved to it
    c.tolerance = 0.05  # relative; the solver fails rather than exceed it
    c.patterns = PATTERNS  # parallel | serial | hierarchical | cnn | vit
    c.fusions = FUSIONS  # the parallel pattern's fusions: concat | add | gating | cross_attention | fcu | bridge
    c.seeds = (0, 1, 2)
    c.train_fractions = (1.0, 0.1)  # dataset-size axis: the first fraction of the training split
    # Every train fraction trains for the step count of the full set at num_epochs, so the data-size axis changes
    # only how many distinct images a model sees (10% of the data = 10 epochs of it), not its compute.
    c.same_steps = True
    c.results_dir = "experiments/ablation/results"
    c.compilation_cache = True  # JAX's persistent cache in {workdir}/jax_cache: seeds and fractions compile once
    c.shift = ml_collections.ConfigDict()
    c.shift.corruptions = CORRUPTIONS  # gaussian_noise | blur | contrast, each at one severity
    c.shift.noise_std = 0.2  # of the [0, 1] pixel range (ImageNet-C severity 3: 0.18)
    c.shift.blur_sigma = 1.0  # pixels at 28 px (a garment's stitching and print vanish)
    c.shift.contrast = 0.3  # 1 keeps the image (ImageNet-C severity 3: 0.2)
    c.shift.seed = 0
    c.shift.num_examples = 2000  # the first N of the eval split, each corrupted three ways (and scored clean)
    c.train = train_config()
    if arg == "tiny":  # two small models, two seeds, a few steps: the tests and the notebook's smoke setting
        c.budget_gmacs = 0.001
        c.patterns = ("parallel", "cnn")
        c.fusions = ("gating",)
        c.seeds = (0, 1)
        c.results_dir = "runs/ablation_tiny_results"
        c.train.batch_size = 32
        c.train.eval_batch_size = 128
        c.train.total_steps = 6
        c.train.warmup_steps = 2
        c.train.log_every = 3
        c.train.checkpoint_every = 3
        c.train.eval_split = "test[:256]"
        c.shift.num_examples = 256
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; use '' or 'tiny'")
    return c
