"""Person re-identification on Market-1501 (or DukeMTMC-reID / MSMT17) from a local copy.

python -m hybrid_jax.main --config configs/reid_market1501.py --workdir runs/market \
    --config.manual_dir=/data/Market-1501-v15.09.15
python -m hybrid_jax.main --config configs/reid_market1501.py:resnet50 --workdir runs/market_r50 \
    --config.manual_dir=/data/Market-1501-v15.09.15
python -m hybrid_jax.main --config configs/reid_market1501.py --workdir runs/duke \
    --config.dataset=dukemtmc_reid --config.manual_dir=/data/DukeMTMC-reID

The datasets cannot be downloaded by a script: get them from their authors and point
`manual_dir` at the extracted folder (bounding_box_train/, query/, bounding_box_test/; for
msmt17 the folder with list_train.txt and train/, test/). The first run converts it into
array_record files under the tfds data dir; later runs read those. The recipe follows Bag of
Tricks (arXiv 1903.07071): P x K = 16 x 4, ID loss with label smoothing through a BNNeck,
triplet (margin 0.3) and center loss, Adam at 3.5e-4 with warmup, 120 epochs.
"""

from hybrid_jax.data.augment import IMAGENET_MEAN, IMAGENET_STD
from hybrid_jax.train.config import default_config, model_config


def get_config(arg: str | None = None):
    """`arg`: "" for the TCCNet-style network, "resnet50" for the Bag of Tricks CNN baseline."""
    c = default_config()
    c.task = "reid"
    c.dataset = "market1501"  # or dukemtmc_reid, msmt17
    c.manual_dir = ""  # the extracted dataset; "" means {data_dir}/downloads/manual
    c.model = model_config("tccnet_s_224")
    # The TCCNet-style model's concat coupling needs a square token grid (hybrid_jax/fusion/base.py),
    # so crops are resized to 224x224 instead of re-ID's usual 256x128.
    c.resize = (224, 224)
    c.dtype = "bfloat16"
    c.batch_size = 64  # P = 16 identities x K = 4 images
    c.reid.images_per_identity = 4
    c.reid.center_weight = 5e-4
    c.eval_batch_size = 512
    c.num_epochs = 120.0  # of the 12,936 training images
    c.optimizer = "adamw"
    c.learning_rate = 3.5e-4
    c.min_learning_rate = 1e-6
    c.warmup_steps = 2000  # about 10 epochs
    c.weight_decay = 5e-4
    c.label_smoothing = 0.1
    c.augment.random_resized_crop = True
    c.augment.crop_scale = (0.64, 1.0)
    c.augment.flip = True
    c.augment.mean, c.augment.std = IMAGENET_MEAN, IMAGENET_STD
    c.eval_at_start = True
    c.eval_every = 2000
    c.log_every = 100
    c.checkpoint_every = 2000
    c.worker_count = 4  # JPEG decoding on the host
    if arg == "resnet50":
        c.model = model_config("resnet50")
        c.resize = (256, 128)
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; use '' or 'resnet50'")
    return c
