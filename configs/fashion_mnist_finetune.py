"""Fine-tuning a pretrained model on Fashion-MNIST: timm's ResNet-18 weights, a new 10-class head, layer decay.

python -m hybrid_jax.main --config configs/fashion_mnist_finetune.py --workdir runs/ft \
    --config.init_from=resnet18.safetensors
python -m hybrid_jax.main --config configs/fashion_mnist_finetune.py --workdir runs/ft_eval \
    --config.mode=eval --config.init_from=runs/ft          # score the fine-tuned run again, train nothing

The weights are any checkpoint of config.model's reference implementation, read from a local
file (nothing is downloaded): on a machine with internet, `timm.create_model("resnet18",
pretrained=True)` and `safetensors.torch.save_file(model.state_dict(), "resnet18.safetensors")`.
Its 1000-class head is replaced by a fresh 10-class one and its RGB stem summed to read the
one grey channel (hybrid_jax/train/init_from.py). Any other model: --config.model.name=...
with its own checkpoint; a run of ours (its workdir) works as init_from too.
"""

from hybrid_jax.train.config import default_config, model_config


def get_config(arg: str | None = None):
    """`arg`: "" for one epoch at 64 px, "smoke" for 20 steps at 32 px (the tests' setting)."""
    c = default_config()
    c.model = model_config("resnet18")
    c.init_from = ""  # required: --config.init_from=PATH
    c.dataset = "fashion_mnist"
    c.resize = (64, 64)  # ResNet-18 downsamples 32x: 64 px leaves a 2 x 2 final map
    c.batch_size = 64
    c.num_epochs = 1.0
    c.optimizer = "adamw"
    c.learning_rate = 1e-3
    c.layer_decay = 0.75  # the stem learns at 0.75^5 of the head's rate (BEiT / timm)
    c.warmup_steps = 100
    c.weight_decay = 0.05
    c.label_smoothing = 0.1
    c.augment.flip = False
    c.augment.mean = (0.286,)  # Fashion-MNIST pixel statistics
    c.augment.std = (0.353,)
    c.eval_every = 10**9  # once, at the end
    c.checkpoint_every = 500
    if arg == "smoke":
        c.resize = (32, 32)
        c.total_steps = 20
        c.warmup_steps = 2
        c.log_every = 5
        c.checkpoint_every = 20
        c.eval_batch_size = 1000
        c.eval_split = "test[:1000]"
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; use '' or 'smoke'")
    return c
