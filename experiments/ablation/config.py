"""The study: five integration patterns and six fusions at matched compute, with tuned rates and seeds.

python -m experiments.ablation.run --config experiments/ablation/config.py --workdir runs/study --max_hours 2.5
python -m experiments.ablation.run --config experiments/ablation/config.py:tiny --workdir /tmp/study_tiny

Every model is scaled to each of `budgets` (within `tolerance`) by the width/depth solver.
First a learning-rate search: each model at the main budget, each candidate rate, one seed,
trained on the first 90% of the training split and scored on the rest ({workdir}/lr_search).
Then every (budget, train fraction, seed, model) is one `train_and_evaluate` run at the model's
chosen rate in {workdir}/gmacs{budget}/data{percent}/{model}_{fusion}_seed{k}, scored on the
test split and on corrupted copies of it at three severities. Any training key can be changed
from the command line under `train.`, e.g. `--config.train.num_epochs=3`.

What it costs on the project's 2-core CPU machine, and how it splits: 30 search runs of one
epoch (54,000 images) plus one past the grid's edge for every model whose best rate lies there
(10 in the committed study), 30 runs at 0.02 GMACs and 21 at 0.005 GMACs of 936 steps of 128,
and 15 runs on 10% of the data. Left out to fit: at 0.005 GMACs the concat, add and
cross-attention fusions (gating, FCU and the bridge train there), and on 10% of the data every
fusion but gating. Measured (results/runs.csv and lr_search.csv, on a machine shared with other
work, so 1-3x the quiet time): search runs 133-638 s (3.1 h in all), 0.02 GMACs runs 216-898 s
(3.6 h), 0.005 GMACs runs 76-371 s (0.9 h), 10%-data runs 224-351 s (1.2 h): 8.8 h, about 6 h
quiet, so three parts of `--max_hours 2.5` on a quiet machine (the same command each time; a part
starts no run after its hours, finishes the one in flight, and the next carries on). The order
makes a stopped part useful: the search, then the main budget seed by seed, then the small
budget, then the 10% data. On a GPU the whole study runs at once.
"""

import ml_collections

from experiments.ablation.grid import CORRUPTIONS, FUSIONS, PATTERNS
from hybrid_jax.train.config import default_config


def train_config() -> ml_collections.ConfigDict:
    """The training recipe every run shares: configs/fashion_mnist.py's, at 32 px, one epoch, no progress bar."""
    c = default_config()
    c.dataset = "fashion_mnist"
    # 32 px: every family's stages then halve evenly (MaxViT's windows, CoAtNet's stages, the 8 x 8 token grid).
    c.resize = (32, 32)
    c.batch_size = 128
    c.eval_batch_size = 500
    c.num_epochs = 2.0  # 938 steps; the study's time goes here (see the module docstring)
    c.optimizer = "adamw"
    c.learning_rate = 2e-3  # replaced per model by the held-out search (get_config's lr_search)
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
    """`arg`: "" the study (three parts of at most 2.5 h on 2 CPU cores); "tiny" a seconds-long run of the engine."""
    c = ml_collections.ConfigDict()
    # Multiply-adds per 32 px image, billions; every model is solved to each. The first is the main budget
    # (the default hybrid's scale, 0.024 at 28 px), the second 4x smaller: does the ranking hold with compute?
    c.budgets = (0.02, 0.005)
    c.tolerance = 0.05  # relative; the solver fails rather than exceed it
    c.patterns = PATTERNS  # parallel | serial | hierarchical | cnn | vit
    c.fusions = FUSIONS  # the parallel pattern's fusions: concat | add | gating | cross_attention | fcu | bridge
    c.seeds = (0, 1, 2)
    # Dataset-size axis, at the main budget: the first fraction of the training split. Every fraction trains for
    # the full set's step count (`same_steps`), so it changes how many distinct images a model sees, not its compute.
    c.train_fractions = (1.0, 0.1)
    c.small_data_fusions = ("gating",)  # the parallel fusions trained on the smaller fractions (time: see docstring)
    # The parallel fusions trained at the other budgets: the default (gating) and the two headline systems' couplings
    # (Conformer's FCU, Mobile-Former's bridge); the other three at 0.005 were left out to fit (see docstring).
    c.small_budget_fusions = ("gating", "fcu", "bridge")
    c.same_steps = True
    # Each model's learning rate, chosen on held-out data: one seed per rate, trained on the first 90% of the
    # training split for `lr_search.num_epochs` and scored on the last 10% (the test split is never looked at).
    c.lr_search = ml_collections.ConfigDict()
    # Part 1 searched (1e-3, 2e-3, 4e-3): every parallel fusion it reached chose 4e-3, the grid's edge, and scored
    # 3-6 points lower at 1e-3 (those runs stay in {workdir}/lr_search), so from part 2 on the grid moves up.
    c.lr_search.learning_rates = (2e-3, 4e-3, 8e-3)
    # Part 2 found every model's best at an edge of that grid, so a best at the edge of the rates tried is
    # followed one doubling (halving) further, up to this many past the grid: 1e-3 and 1.6e-2 at most.
    c.lr_search.extend_steps = 1
    c.lr_search.holdout = 0.1
    c.lr_search.num_epochs = 1.0
    c.lr_search.seed = 0
    c.results_dir = "experiments/ablation/results"
    c.compilation_cache = True  # JAX's persistent cache in {workdir}/jax_cache: seeds and fractions compile once
    c.shift = ml_collections.ConfigDict()
    c.shift.corruptions = CORRUPTIONS  # gaussian_noise | blur | contrast
    # Severities 1..3 of each corruption (ImageNet-C's severity 3: noise 0.18, contrast 0.2).
    c.shift.noise_std = (0.1, 0.2, 0.3)  # of the [0, 1] pixel range
    c.shift.blur_sigma = (0.5, 1.0, 1.5)  # pixels at 28 px (at 1.0 a garment's stitching and print vanish)
    c.shift.contrast = (0.5, 0.3, 0.15)  # 1 keeps the image
    c.shift.seed = 0
    c.shift.num_examples = 2000  # the first N of the eval split, corrupted at every severity (and scored clean)
    c.train = train_config()
    if arg == "tiny":  # two small models, one seed, a few steps: the tests' and the notebook's smoke setting
        c.budgets = (0.001, 0.0005)
        c.patterns = ("parallel", "cnn")
        c.fusions = ("gating",)
        c.seeds = (0,)
        c.lr_search.learning_rates = (1e-3, 4e-3)
        c.lr_search.extend_steps = 0
        c.lr_search.num_epochs = 0.0  # 0: the runs' own total_steps
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
