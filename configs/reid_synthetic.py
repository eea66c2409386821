"""Person re-identification on the SYNTHETIC re-ID benchmark: offline, on CPU in minutes.

python -m hybrid_jax.main --config configs/reid_synthetic.py --workdir runs/reid
python -m hybrid_jax.main --config configs/reid_synthetic.py:cnn --workdir runs/reid_cnn   # CNN-only backbone
python -m hybrid_jax.main --config configs/reid_synthetic.py:vit --workdir runs/reid_vit   # ViT-only backbone
python -m hybrid_jax.main --config configs/reid_synthetic.py:smoke --workdir /tmp/reid_smoke   # 30 steps

The data are drawn figures rendered on first use (hybrid_jax/data/builders/reid_synthetic.py:
300 training and 300 test identities, 6 cameras, 64x32 crops), not photographs; nothing is
downloaded. The TCCNet-style network trains with identity loss through a BNNeck plus
batch-hard triplet loss on P x K = 16 x 4 batches, and is scored by rank-1/5/10 and mAP
of the query split against the gallery, before training (step 0) and after.
"""

from hybrid_jax.train.config import default_config, model_config

# Backbones of similar cost at the 32x32 training input, as (model, changed fields); GMACs of the
# backbone forward at batch 1 (hybrid_jax.analysis.flops.count_macs).
BACKBONES = {
    "tccnet": ("tccnet_tiny", {}),  # CNN + ViT branches, concat coupling after stage 1, cross-attention after 4
    "cnn": ("resnet18", {}),  # CNN only
    "vit": ("test_vit", dict(embed_dim=96, depth=4, num_heads=3)),  # ViT only, 4x4 patches
}


def _backbone(key: str):
    name, fields = BACKBONES[key]
    return model_config(name, **fields)


def get_config(arg: str | None = None):
    """`arg`: "" or "tccnet" (default backbone), "cnn", "vit", or "smoke" for a 30-step check."""
    c = default_config()
    c.task = "reid"
    c.dataset = "reid_synthetic"
    # The TCCNet-style model's concat coupling needs a square token grid (hybrid_jax/fusion/base.py),
    # so the 64x32 crops are resized to 32x32 for every backbone alike.
    c.resize = (32, 32)
    c.model = _backbone("tccnet")
    c.batch_size = 64  # P = 16 identities x K = 4 images
    c.reid.images_per_identity = 4
    c.eval_batch_size = 256
    c.total_steps = 600
    c.optimizer = "adamw"
    c.learning_rate = 3e-3
    c.warmup_steps = 60
    c.weight_decay = 0.05
    c.label_smoothing = 0.1
    c.augment.random_resized_crop = True
    c.augment.crop_scale = (0.6, 1.0)
    c.augment.flip = True
    c.augment.mean = (0.5, 0.5, 0.5)
    c.augment.std = (0.25, 0.25, 0.25)
    c.eval_at_start = True
    c.eval_every = 300
    c.log_every = 25
    c.checkpoint_every = 300
    if arg in BACKBONES:
        c.model = _backbone(arg)
    elif arg == "smoke":  # the smaller synthetic set and a 2-block ViT of 50k parameters
        c.dataset = "reid_synthetic/tiny"
        c.model = model_config("test_vit")
        c.batch_size = 32
        c.total_steps = 30
        c.warmup_steps = 5
        c.log_every = 10
        c.eval_every = 30
        c.checkpoint_every = 30
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; use '', 'tccnet', 'cnn', 'vit' or 'smoke'")
    return c
