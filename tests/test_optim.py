"""The optimizer recipe: weight-decay mask, layer-wise learning-rate decay (against timm), freezing, BatchNorm EMA."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from hybrid_jax import create_model, list_models, model_info
from hybrid_jax.data.augment import AugmentConfig
from hybrid_jax.parallel.mesh import make_mesh
from hybrid_jax.parallel.rules import DEFAULT_RULES
from hybrid_jax.reid.model import ReidModel
from hybrid_jax.train.config import default_config
from hybrid_jax.train.layer_decay import layer_ids, layer_scales, path_name
from hybrid_jax.train.optim import decay_mask, make_optimizer
from hybrid_jax.train.state import create_train_state
from hybrid_jax.train.step import apply_gradients, train_step

# Names that mark a learned position, token or relative table (or re-ID class centres).
TABLE = re.compile(r"pos|rel|token|bias_table|attention_biases|centers")
STEM = re.compile(r"^(stem\w*|hybrid_stem|patch_embed|cls_token|pos_embed|tokens|conv1|bn1)(/|$)")
HEAD = re.compile(r"^(head|head_dist|pre_logits|conv_cls_head|trans_cls_head|classifier/(fc\w*|kernel)|bnneck|centers)"
                  r"(/|$)")


@functools.cache
def _abstract(name: str) -> tuple[nn.Module, dict, list[str]]:
    """The model, its parameters' shapes (eval_shape: nothing computed) and their names in creation order."""
    if name == "reid_test_vit":
        model, size = ReidModel(create_model("test_vit", num_classes=0), num_classes=5, center_loss=True), 32
    else:
        model, size = create_model(name), model_info(name).input_size
    order = []

    def init():
        variables = model.init({"params": jax.random.key(0), "dropout": jax.random.key(0)},
                               jnp.zeros((1, size, size, 3)), train=False)
        walk(variables["params"], "")
        return variables["params"]

    def walk(tree: dict, prefix: str) -> None:
        # Flax fills its dicts as the forward pass creates parameters; pytree flattening would sort them.
        for key, value in tree.items():
            walk(value, f"{prefix}{key}/") if isinstance(value, dict) else order.append(prefix + key)

    return model, nn.meta.unbox(jax.eval_shape(init)), order


def _named(tree) -> dict:
    return {path_name(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _check_decay_mask(name: str) -> None:
    """Weight decay spares every learned table (position, token, relative bias, class centre), decays every kernel."""
    _, params, _ = _abstract(name)
    shapes, decayed = _named(params), _named(decay_mask(params, tuple(default_config().no_decay)))
    tables = [n for n in shapes if not n.endswith("/kernel") and (TABLE.search(n) or len(shapes[n].shape) > 1)]
    assert not [n for n in tables if decayed[n]], "learned tables that weight decay would pull to zero"
    assert all(decayed[n] for n in shapes if n.endswith("/kernel")), "conv / Dense kernels left undecayed"
    assert not any(decayed[n] for n in shapes if len(shapes[n].shape) <= 1)


def _check_layer_order(name: str) -> None:
    """Layer ids run 0 .. L + 1 without gaps: the stem 0, the head L + 1, never decreasing along the blocks."""
    model, params, order = _abstract(name)
    ids = _named(layer_ids(params, model))
    top = max(ids.values())
    assert sorted(set(ids.values())) == list(range(top + 1)) and top >= 2
    assert ids[order[0]] == 0 and all(ids[n] == 0 for n in ids if STEM.match(n))
    assert ids[order[-1]] == top and all(ids[n] == top for n in ids if HEAD.match(n))
    # Embeddings of a parallel branch (Conformer's patch conv) are created late but stay layer 0.
    blocks = [ids[n] for n in order if ids[n]]
    assert blocks == sorted(blocks), "a layer id decreases along the forward order"


@pytest.mark.parametrize("name", list_models() + ["reid_test_vit"])
def test_every_model_has_a_decay_mask_and_a_layer_order(name):
    """One test per model, so that each model's parameters are traced once (jax.eval_shape: nothing computed)."""
    _check_decay_mask(name)
    _check_layer_order(name)


def test_a_wrapped_backbone_keeps_its_order_under_its_own_head():
    wrapper, params, _ = _abstract("reid_test_vit")
    backbone = create_model("test_vit", num_classes=0)
    inner = _named(layer_ids(params["backbone"], backbone))
    ids = _named(layer_ids(params, wrapper))
    assert {n: ids[f"backbone/{n}"] for n in inner} == inner
    assert {ids[n] for n in ids if not n.startswith("backbone/")} == {max(inner.values()) + 1}
    assert not decay_mask(params, tuple(default_config().no_decay))["centers"]


TIMM_CASES = {  # our name: (timm name, keyword arguments for both)
    "vit_tiny_patch16_224": ("vit_tiny_patch16_224", {}),
    "convit_tiny": ("convit_tiny", {}),
    "resnet18": ("resnet18", {}),
    "levit_128s": ("levit_128s", {}),
    "coatnet_0_rw_224": ("coatnet_0_rw_224", {}),
    "maxvit_tiny_tf_224": ("maxvit_tiny_tf_224", {}),
    "mobilevit_xxs": ("mobilevit_xxs", {}),
    "edgenext_xx_small": ("edgenext_xx_small", {}),
    "botnet26t_256": ("botnet26t_256", {"img_size": 128}),
}


@pytest.mark.parametrize("name", list(TIMM_CASES))
def test_layer_scales_equal_timm_param_groups_layer_decay(name):
    """Each timm parameter is filled with its group's lr_scale and converted; every converted leaf must hold ours."""
    timm = pytest.importorskip("timm")
    import torch
    from timm.optim import param_groups_layer_decay

    from hybrid_jax.convert import convert_state_dict

    timm_name, kwargs = TIMM_CASES[name]
    reference = timm.create_model(timm_name, pretrained=False, **kwargs)
    group_scale = {id(p): g["lr_scale"] for g in param_groups_layer_decay(reference, layer_decay=0.75)
                   for p in g["params"]}
    scales = {n: group_scale[id(p)] for n, p in reference.named_parameters()}
    assert len(set(scales.values())) > 3
    state = {k: torch.full_like(v, scales.get(k, 0.0)) if v.is_floating_point() else v
             for k, v in reference.state_dict().items()}
    model = create_model(name, **kwargs)
    params = convert_state_dict(name, state, model)["params"]
    ours = _named(layer_scales(params, model, 0.75))
    for n, leaf in _named(params).items():
        np.testing.assert_allclose(leaf, ours[n], rtol=1e-6, err_msg=n)


def _config(**overrides):
    config = default_config()
    config.update(dict(warmup_steps=1, learning_rate=1e-2, weight_decay=0.1, **overrides))
    return config


@jax.jit
def _grads(params, seed):
    return jax.tree.map(lambda p: jax.random.normal(jax.random.key(seed), p.shape), params)


@functools.cache
def _test_vit() -> tuple[nn.Module, dict]:
    model = create_model("test_vit")
    return model, jax.jit(lambda x: nn.meta.unbox(model.init(jax.random.key(0), x, train=False)["params"]))(
        jnp.zeros((1, 32, 32, 3)))


@pytest.mark.parametrize("optimizer", ["adamw", "sgd", "lamb"])
def test_layer_decay_scales_each_update_by_its_layer(optimizer):
    """layer_decay=1 is today's recipe exactly; otherwise each update is that one times its layer's scale."""
    model, params = _test_vit()
    config = _config(optimizer=optimizer)
    mask = lambda p: decay_mask(p, tuple(config.no_decay))
    schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 1, 10, config.min_learning_rate)
    inner = {"adamw": lambda: optax.adamw(schedule, weight_decay=0.1, mask=mask),
             "lamb": lambda: optax.lamb(schedule, weight_decay=0.1, mask=mask),
             "sgd": lambda: optax.chain(optax.add_decayed_weights(0.1, mask),
                                        optax.sgd(schedule, momentum=0.9, nesterov=True))}[optimizer]()
    txs = [optax.chain(optax.clip_by_global_norm(1.0), inner), make_optimizer(config, 10)[0],
           make_optimizer(_config(optimizer=optimizer, layer_decay=0.5), 10, model)[0]]
    states = [tx.init(params) for tx in txs]
    updates = [jax.jit(tx.update) for tx in txs]
    scales = layer_scales(params, model, 0.5)
    for step in range(3):
        grads = _grads(params, step)
        (today, states[0]), (same, states[1]), (decayed, states[2]) = [
            update(grads, state, params) for update, state in zip(updates, states)]
        jax.tree.map(np.testing.assert_array_equal, same, today)
        jax.tree.map(lambda d, u, s: np.testing.assert_array_equal(d, u * s), decayed, today, scales)
        params = jax.jit(optax.apply_updates)(params, today)


def test_layer_decay_needs_a_model_of_a_known_family():
    with pytest.raises(ValueError, match="needs the model"):
        make_optimizer(_config(layer_decay=0.75), 10)
    with pytest.raises(ValueError, match="no layer order for the 'test_optim' family"):
        make_optimizer(_config(layer_decay=0.75), 10, TinyBatchNormNet())


def _train(model_name: str, config, steps: int) -> list:
    """The states after each of a few jitted train steps on a mesh, from `create_train_state`, as the loop runs them."""
    model = create_model(model_name, num_classes=10)
    size = model_info(model_name).input_size
    tx, schedule = make_optimizer(config, 10, model)
    mesh = make_mesh((4, 2, 1))
    state, shardings = create_train_state(model, tx, (size, size, 3), seed=0, use_ema=True, mesh=mesh,
                                          rules=DEFAULT_RULES)
    batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    step = jax.jit(functools.partial(train_step, model=model, tx=tx, schedule=schedule, augment=AugmentConfig(),
                                     num_classes=10, label_smoothing=0.1, ema_decay=0.9, grad_accum_steps=1),
                   in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None))
    rng = np.random.default_rng(0)
    states = [state]
    for _ in range(steps):
        batch = {"image": rng.integers(0, 256, (16, size, size, 3), dtype=np.uint8),
                 "label": rng.integers(0, 10, (16,), dtype=np.int32)}
        states.append(step(states[-1], jax.device_put(batch, batch_sharding))[0])
    return states


def test_frozen_parameters_stay_exactly_and_hold_no_optimizer_state():
    config = _config(optimizer="adamw", freeze=(r"^patch_embed/", r"^blocks_0/attn/"), layer_decay=0.75)
    first, *_, last = _train("test_vit", config, steps=3)
    before, after = _named(jax.device_get(first.params)), _named(jax.device_get(last.params))
    frozen = [n for n in before if n.startswith(("patch_embed/", "blocks_0/attn/"))]
    assert len(frozen) == 10
    for n in before:
        if n in frozen:
            np.testing.assert_array_equal(after[n], before[n], err_msg=n)
        else:
            assert np.any(after[n] != before[n]), f"{n} did not train"
    moments = [n for n in _named(last.opt_state) if n.endswith(("/kernel", "/bias"))]
    assert moments and not [n for n in moments if any(f in n for f in frozen)]


class TinyBatchNormNet(nn.Module):
    """A conv, a BatchNorm and a classifier: the least that has running statistics."""

    @nn.compact
    def __call__(self, x, *, train: bool):
        x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(nn.Conv(4, (3, 3))(x))
        return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


def test_ema_averages_batch_statistics_like_parameters():
    """Two steps of decay 0.9: ema = 0.9 (0.9 s0 + 0.1 s1) + 0.1 s2 for the running statistics s_k after step k."""
    model, config = TinyBatchNormNet(), _config(optimizer="sgd")
    tx, _ = make_optimizer(config, 10)
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    states = [create_train_state(model, tx, (8, 8, 3), seed=0, use_ema=True, mesh=mesh, rules=DEFAULT_RULES)[0]]

    @jax.jit
    def step(state, images):
        def loss(params):
            logits, updates = model.apply({"params": params, "batch_stats": state.batch_stats}, images, train=True,
                                          mutable=["batch_stats"])
            return logits.sum(), updates["batch_stats"]

        grads, batch_stats = jax.grad(loss, has_aux=True)(state.params)
        return apply_gradients(state, grads, batch_stats, tx=tx, ema_decay=0.9, grad_accum_steps=1)

    for seed in range(2):
        states.append(step(states[-1], jax.random.normal(jax.random.key(seed), (4, 8, 8, 3)) + seed))
    s0, s1, s2 = [jax.device_get(s.batch_stats) for s in states]
    expected = jax.tree.map(lambda a, b, c: 0.9 * (0.9 * a + 0.1 * b) + 0.1 * c, s0, s1, s2)
    jax.tree.map(lambda e, x: np.testing.assert_allclose(e, x, rtol=1e-6), expected,
                 jax.device_get(states[-1].ema_batch_stats))
    assert all(np.all(a != b) for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2)))
    state, _ = create_train_state(model, tx, (8, 8, 3), seed=0, use_ema=False, mesh=mesh, rules=DEFAULT_RULES)
    assert state.ema_batch_stats is None
