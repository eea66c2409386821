"""Rematerialisation and scanned block stacks: the same model, the same numbers, another memory or compile cost."""

import re

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import timm

from hybrid_jax import create_model, list_models, model_info
from hybrid_jax.layers.remat import checkpointed
from hybrid_jax.layers.scan import stack_layers, unstack_layers
from hybrid_jax.tasks import make_task
from hybrid_jax.train.config import ConfigError, default_config, model_config
from tests.parity import check_parity

SMALL = {model_info(n).family: n for n in reversed(list_models()) if model_info(n).paper is None
         and model_info(n).input_size <= 64}  # one small model per family
# Blocks called with a shape tuple (ConViT) and the ResNet blocks inside a stage; under -m slow (minutes each on
# CPU) a second array (Conformer's tokens, CMT's bias) and tokens in and out (Mobile-Former).
GRADIENT_CHECKED = ["test_convit", "test_resnet", *(pytest.param(name, marks=pytest.mark.slow) for name in (
    "conformer_tiny_32", "test_cmt", "mobile_former_tiny_32"))]


def _images(name: str) -> jax.Array:
    size = model_info(name).input_size
    return jax.random.uniform(jax.random.key(0), (2, size, size, 3), minval=-1, maxval=1)


def _loss_fn(model, variables, x):
    def loss(params):
        logits, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"],
                                rngs={"dropout": jax.random.key(2)})
        logits = logits[0] if isinstance(logits, tuple) else logits
        return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.array([1, 3])).mean()
    return loss


def _init(model, x):
    return nn.meta.unbox(jax.jit(lambda x: model.init(jax.random.key(1), x, train=False))(x))


@pytest.mark.parametrize("name", sorted(SMALL.values()))
def test_remat_keeps_the_variables_and_checkpoints_the_blocks(name):
    x = _images(name)
    shapes = {remat: jax.eval_shape(lambda x, r=remat: create_model(name, remat=r).init(jax.random.key(1), x,
                                                                                        train=False), x)
              for remat in ("none", "full")}
    assert jax.tree.structure(shapes["full"]) == jax.tree.structure(shapes["none"])
    model = create_model(name, remat="full")
    jaxpr = jax.make_jaxpr(lambda v: model.apply(v, x, train=False))(nn.meta.unbox(shapes["full"]))
    assert any(eqn.primitive.name.startswith(("checkpoint", "remat")) for eqn in jaxpr.jaxpr.eqns)


@pytest.mark.parametrize("name", GRADIENT_CHECKED)
def test_remat_gives_the_same_loss_and_gradients(name):
    x = _images(name)
    results = {}
    for remat in ("none", "block", "full"):
        model = create_model(name, remat=remat, drop_path_rate=0.1)
        variables = _init(model, x)
        results[remat] = jax.jit(jax.value_and_grad(_loss_fn(model, variables, x)))(variables["params"])
    loss, grads = results["none"]
    for remat in ("block", "full"):
        other_loss, other_grads = results[remat]
        np.testing.assert_allclose(other_loss, loss, rtol=1e-5)
        # Float noise far below the gradients' scale (a bias feeding a norm, ~1e-7) may differ in sign.
        atol = 1e-5 * max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads))
        jax.tree.map(lambda a, b, atol=atol: np.testing.assert_allclose(a, b, rtol=1e-4, atol=atol), other_grads, grads)


def test_remat_modes_reach_xla_as_recomputed_or_saved_matmuls():
    """In the compiled train step, "full" recomputes the matmuls of a block in the backward pass; "block" saves the
    weight matmuls and recomputes only attention's batched products; "none" recomputes nothing.

    (XLA:CPU's buffer plan does not shrink with remat, so memory is measured on an accelerator:
    experiments/benchmarks/README.md.)
    """
    x = jax.ShapeDtypeStruct((4, 32, 32, 3), jnp.float32)
    recomputed = {}
    for remat in ("none", "block", "full"):
        model = create_model("test_vit", remat=remat)
        variables = jax.eval_shape(lambda x, m=model: nn.meta.unbox(m.init(jax.random.key(1), x, train=False)), x)
        grad = jax.jit(jax.grad(lambda p, x, m=model: m.apply({"params": p}, x, train=True,
                                                              rngs={"dropout": jax.random.key(0)}).sum()))
        hlo = grad.lower(variables["params"], x).compile().as_text()
        # A dot's op_name ends in its module ("attn/query") or einsum ("attn/bnth,bnsh->bnts"), then dot_general.
        recomputed[remat] = {name.split("/")[-2] for name in re.findall(r'= \S+ dot\(.*op_name="([^"]*)"', hlo)
                             if "rematted_computation" in name}
    weight_matmuls = {"query", "key", "value", "out", "fc1"}
    assert recomputed["none"] == set()
    assert recomputed["block"] and all("->" in name for name in recomputed["block"]), recomputed
    assert weight_matmuls <= recomputed["full"], recomputed


def test_checkpointed_block_keeps_its_name_and_rejects_unknown_modes():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, *, train):
            return nn.Dropout(0.5, deterministic=not train)(nn.Dense(3)(x))

    assert checkpointed(Block, "none") is Block
    assert checkpointed(Block, "full").__name__ == "Block"
    with pytest.raises(ValueError, match="none, block, full"):
        checkpointed(Block, "some")


def test_config_remat_reaches_the_model_the_loop_builds():
    config = default_config()
    config.remat = "full"
    assert make_task(config).build_model(jnp.float32).remat == "full"
    config.remat = "all"
    with pytest.raises(ConfigError, match="config.remat='all'; choose one of"):
        make_task(config)
    assert "remat" not in model_config("test_resnet")  # a run setting, not a field of config.model


# Models with the runs their scan forms: runs of identical blocks, never across a change of block or a fusion.
SCANNED = [
    ("test_vit", dict(depth=3, drop_path_rate=0.2), ["blocks_0to2"]),
    ("test_vit_r50", dict(depth=2), ["blocks_0to1"]),  # the ResNet stem's own blocks_0 stay looped
    ("test_convit", dict(depth=5, local_up_to_layer=3), ["blocks_0to2", "blocks_3to4"]),
    pytest.param("parallel_hybrid_tiny", dict(depths=(2, 1, 3, 1)), ["blocks_0to1", "blocks_3to5"],
                 marks=pytest.mark.slow),
    pytest.param("test_levit", dict(depth=(2, 3)), ["stages_0/blocks_0to1", "stages_1/blocks_0to2"],
                 marks=pytest.mark.slow),
    pytest.param("conformer_tiny_32", dict(depth=9), ["conv_trans_2to3", "conv_trans_5to6"], marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name, fields, runs", SCANNED)
def test_scanned_blocks_compute_what_the_loop_does(name, fields, runs):
    x = _images(name)
    loop, scan = create_model(name, **fields), create_model(name, scan_blocks=True, **fields)
    variables, scanned = _init(loop, x), _init(scan, x)
    names = {"/".join(path) for path in flax.traverse_util.flatten_dict(scanned["params"])}
    assert sorted({re.sub(r"(to\d+)/.*", r"\1", n) for n in names if re.search(r"_\d+to\d+/", n)}) == runs
    stacked = stack_layers(variables, like=scanned)
    assert jax.tree.map(np.shape, stacked) == jax.tree.map(np.shape, scanned)
    jax.tree.map(np.testing.assert_array_equal, unstack_layers(stacked), variables)

    def features(model, variables, train):  # the features and the batch statistics, moved in train mode
        return model.apply(variables, x, train=train, method=model.forward_features, mutable=["batch_stats"],
                           rngs={"dropout": jax.random.key(3)})

    # Train mode too where a scanned run holds batch statistics, which it must update per layer.
    stats = flax.traverse_util.flatten_dict(scanned.get("batch_stats", {}), sep="/")
    for train in (False, True) if any(re.search(r"_\d+to\d+/", path) for path in stats) else (False,):
        ours, theirs = (jax.jit(features, static_argnums=(0, 2))(m, v, train)
                        for m, v in ((scan, stacked), (loop, variables)))
        _assert_close_trees(ours, (theirs[0], stack_layers(theirs[1], like=scanned)))
    if name == "test_vit":  # the scan's backward pass is the same for every model
        grads = {}
        for model, v in ((scan, stacked), (loop, variables)):
            loss = lambda p, m=model: m.apply({"params": p}, x, train=False).sum()  # noqa: E731
            grads[model.scan_blocks] = jax.jit(jax.grad(loss))(v["params"])
        _assert_close_trees(grads[True], stack_layers(grads[False], like=scanned["params"]))


def _assert_close_trees(ours, theirs):
    """Equal up to float32 reassociation, measured against the tree's largest value (values of 100 beside 0.1)."""
    scale = max(float(np.abs(leaf).max()) for leaf in jax.tree.leaves(theirs))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale), ours, theirs)


def test_stochastic_depth_in_a_scan_drops_with_each_blocks_rate():
    """Of 2 blocks at drop_path_rate 0.5, the first has rate 0 and the second 0.5 on each of its two branches."""
    x = jnp.broadcast_to(_images("test_vit")[:1], (256, 32, 32, 3))
    model = create_model("test_vit", drop_path_rate=0.5, scan_blocks=True)
    variables = _init(model, x[:1])
    train = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(5)}, method=model.forward_features)
    evaluated = model.apply(variables, x[:1], method=model.forward_features)
    assert np.isclose(train["block0"], evaluated["block0"], atol=1e-5).all()  # nothing dropped at rate 0
    # Both branches of block 1 dropped, so it passes its input through: 0.5 * 0.5 of the examples.
    passed_through = np.isclose(train["block1"], train["block0"], atol=1e-6).all(axis=(1, 2)).mean()
    assert 0.15 < passed_through < 0.35, passed_through


def test_a_scanned_vit_loads_timm_weights():
    check_parity("vit_tiny_patch16_224", timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2), batch=1,
                 depth=2, scan_blocks=True)
