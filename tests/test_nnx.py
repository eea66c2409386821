"""hybrid_jax.nnx: every family as an NNX module equals its Linen self, trains with nnx.Optimizer, and shards.

Variables are mostly drawn on the host (`host_variables`): a model's random initialisation
costs seconds of XLA compilation per parameter shape on these CPUs, and what is tested here
is the bridge, not Linen's initialisers. `test_create_model_shards_under_a_mesh` runs the real
initialisation once.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, traverse_util
from flax.nnx import bridge
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import hybrid_jax.nnx as hnnx
from hybrid_jax import create_model, list_models, model_info
from hybrid_jax.parallel import make_mesh

# The smallest registered variant of each family (registry modules; maxxvit holds CoAtNet and MaxViT).
FAMILIES = {
    "resnet": "test_resnet", "vit": "test_vit", "conformer": "conformer_tiny_32",
    "parallel_hybrid": "parallel_hybrid_tiny", "mobile_former": "mobile_former_tiny_32", "coatnet": "test_coatnet",
    "maxvit": "test_maxvit", "mobilevit": "test_mobilevit", "edgenext": "test_edgenext", "cvt": "test_cvt",
    "cmt": "test_cmt", "levit": "test_levit", "convit": "test_convit", "botnet": "test_botnet",
}
# Their forward passes compile in 5-15 s each on 2 CPU cores; the default suite checks these abstractly.
HEAVY = {"conformer_tiny_32", "parallel_hybrid_tiny", "mobile_former_tiny_32", "test_edgenext", "test_cvt", "test_cmt"}
NUM_CLASSES = 5


def batch_shape(name: str, batch: int = 2) -> tuple[int, int, int, int]:
    side = model_info(name).input_size
    return (batch, side, side, 3)


def host_variables(module: nn.Module, input_shape, seed: int = 0) -> dict:
    """Unboxed variables of `module` drawn with numpy: kernels ~ N(0, 1/fan_in), norm scales and variances near 1."""
    abstract = nn.meta.unbox(jax.eval_shape(lambda x: module.init(jax.random.key(0), x, train=False),
                                            jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name in ("scale", "var", "gamma"):
            value = 1 + 0.2 * rng.random(leaf.shape)
        elif leaf.ndim >= 2:
            value = rng.normal(size=leaf.shape) / math.sqrt(math.prod(leaf.shape[:-1]))
        else:
            value = 0.1 * rng.normal(size=leaf.shape)
        return value.astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def images(shape, seed: int = 1) -> jax.Array:
    return jax.random.uniform(jax.random.key(seed), shape, minval=-1, maxval=1)


def flat(tree) -> dict[str, np.ndarray]:
    return {"/".join(path): leaf for path, leaf in traverse_util.flatten_dict(tree).items()}


def assert_same_tree(actual, expected):
    actual, expected = flat(actual), flat(expected)
    assert actual.keys() == expected.keys()
    for path, value in expected.items():
        np.testing.assert_array_equal(actual[path], value, err_msg=path)


def test_every_registered_family_is_covered():
    covered = {model_info(name).family for name in FAMILIES.values()}
    assert {model_info(name).family for name in list_models()} == covered


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow) if name in HEAVY else name
                                  for name in FAMILIES.values()])
def test_family_equals_its_linen_model(name):
    module = create_model(name, num_classes=NUM_CLASSES)
    shape = batch_shape(name)
    variables = host_variables(module, shape)
    model = hnnx.from_linen(module, variables, rngs=nnx.Rngs(0), input_shape=shape)
    assert_same_tree(model.linen_variables(), variables)
    model.eval()
    x = images(shape)
    ours, linen = nnx.jit(lambda model, variables, x: (model(x), module.apply(variables, x, train=False)))(
        model, variables, x)
    assert ours.shape == (2, NUM_CLASSES)
    np.testing.assert_allclose(ours, linen, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", sorted(HEAVY & set(FAMILIES.values())))
def test_heavy_family_builds_abstractly(name):
    """What the bridge could get wrong per family, without compiling: collections, shapes, logical axis names."""
    module = create_model(name, num_classes=NUM_CLASSES)
    shape = batch_shape(name)
    model = nnx.eval_shape(lambda: hnnx.from_linen(module, rngs=0, input_shape=shape))
    boxed = jax.eval_shape(lambda x: module.init(jax.random.key(0), x, train=False),
                           jax.ShapeDtypeStruct(shape, jnp.float32))
    for collection, kind in hnnx.COLLECTIONS.items():
        ours = {path: var for path, var in nnx.to_flat_state(nnx.state(model.linen, kind))}
        theirs = traverse_util.flatten_dict(boxed.get(collection, {}))  # stops at the boxes
        assert ours.keys() == theirs.keys(), collection
        for path, box in theirs.items():
            assert ours[path].shape == nn.meta.unbox(box).shape, path
            names = box.names if isinstance(box, nn.LogicallyPartitioned) else None
            assert ours[path].get_metadata().get("out_sharding") == names, path


def test_trains_on_a_fixed_batch_and_updates_batch_stats():
    name = "test_resnet"
    module = create_model(name, num_classes=NUM_CLASSES)
    shape = batch_shape(name, batch=4)
    variables = host_variables(module, shape)
    model = hnnx.from_linen(module, variables, rngs=nnx.Rngs(params=0, dropout=1), input_shape=shape)
    x, labels = images(shape), jnp.arange(4) % NUM_CLASSES
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    traces = []

    @nnx.jit
    def step(model, optimizer, x, labels):
        traces.append(1)

        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), labels).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer, x, labels)) for _ in range(6)]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    assert len(traces) == 1  # the updated statistics keep the module's structure: one trace for all steps
    trained = flat(model.linen_variables()["batch_stats"])
    initial = flat(variables["batch_stats"])
    assert all(not np.allclose(trained[path], value) for path, value in initial.items() if path.endswith("mean"))


def test_modes_choose_dropout_or_the_linen_eval_model():
    name = "test_vit"
    module = create_model(name, num_classes=NUM_CLASSES, drop_rate=0.5)
    shape = batch_shape(name)
    variables = host_variables(module, shape)
    model = hnnx.from_linen(module, variables, rngs=nnx.Rngs(0), input_shape=shape)
    x = images(shape)
    model.eval()
    ours, linen = nnx.jit(lambda model, variables, x: (model(x), module.apply(variables, x, train=False)))(
        model, variables, x)
    np.testing.assert_allclose(ours, linen, rtol=1e-6, atol=1e-6)
    model.train()  # each call draws new masks from the module's dropout stream
    first, second = nnx.jit(lambda model, x: (model(x), model(x)))(model, x)
    assert not np.allclose(first, second)


def test_create_model_shards_under_a_mesh():
    mesh = make_mesh((1, 2, 4))  # fsdp shards `embed`, tensor `mlp` and `classes`
    model = hnnx.create_model("test_vit", num_classes=8, rngs=nnx.Rngs(0), input_shape=(4, 32, 32, 3), mesh=mesh)
    params = flat(model.linen_variables()["params"])
    # What DEFAULT_RULES mean on this mesh, written out by hand.
    expected = {"patch_embed/proj/kernel": P(None, None, None, "tensor"),  # 3 input channels: fsdp does not divide
                "blocks_0/mlp/fc1/kernel": P("fsdp", "tensor"), "blocks_0/mlp/fc2/kernel": P("tensor", "fsdp"),
                "head/kernel": P("fsdp", "tensor"), "head/bias": P("tensor")}
    for path, spec in expected.items():
        assert isinstance(params[path].sharding, NamedSharding), path
        assert params[path].sharding.spec == P(*spec, *(None,) * (params[path].ndim - len(spec))), path
    fc1 = params["blocks_0/mlp/fc1/kernel"]
    assert not fc1.sharding.is_fully_replicated
    assert fc1.addressable_shards[0].data.shape == (fc1.shape[0] // 2, fc1.shape[1] // 4)

    # Under the mesh (the activation constraints act), the sharded module computes the Linen model's logits.
    model.eval()
    x = images((4, 32, 32, 3))
    variables = jax.device_get(model.linen_variables())
    module = create_model("test_vit", num_classes=8)
    with jax.set_mesh(mesh):
        ours, linen = nnx.jit(lambda model, variables, x: (model(x), module.apply(variables, x, train=False)))(
            model, variables, x)
    np.testing.assert_allclose(ours, linen, rtol=1e-5, atol=1e-5)


def test_from_linen_loads_bound_variables_and_shards_them():
    name = "test_resnet"
    module = create_model(name, num_classes=NUM_CLASSES)
    shape = batch_shape(name)
    variables = host_variables(module, shape)
    mesh = make_mesh((1, 2, 4))
    # A bound module, as create_model(..., pretrained=...) returns, brings its variables.
    model = hnnx.from_linen(module.bind(variables), rngs=0, input_shape=shape, mesh=mesh)
    loaded = model.linen_variables()
    assert_same_tree(jax.device_get(loaded), variables)
    stem = loaded["params"]["stem"]["conv"]["kernel"]  # (7, 7, 3, C): conv_in 3 stays whole on fsdp=2
    assert stem.sharding.spec == P(None, None, None, "tensor")
    assert loaded["batch_stats"]["stem"]["norm"]["mean"].sharding.is_fully_replicated
    with pytest.raises(ValueError, match="bound to variables already"):
        hnnx.from_linen(module.bind(variables), variables, rngs=0, input_shape=shape)


def _plain_bridge(module, shape):
    """`bridge.ToNNX` + `bridge.lazy_init`, traced only: what a user's first lines do, without the compile."""
    def build():
        model = bridge.ToNNX(module, rngs=nnx.Rngs(params=0, dropout=1))
        bridge.lazy_init(model, jnp.zeros(shape), train=False)
        return model
    return nnx.eval_shape(build)


def test_plain_bridge_with_flax_defaults():
    """The models' parameter boxes (hybrid_jax.layers.axes) ask for lazy placement: no flag, no mesh needed."""
    _plain_bridge(create_model("test_vit", num_classes=NUM_CLASSES), (1, 32, 32, 3))


def test_plain_bridge_with_eager_sharding_off():
    """The plain way, with Flax's scoped switch: builds, matches Linen, updates batch statistics when asked."""
    name = "test_resnet"
    module = create_model(name, num_classes=NUM_CLASSES)
    shape = batch_shape(name, batch=4)
    variables = host_variables(module, shape)
    with nnx.use_eager_sharding(False):
        model = _plain_bridge(module, shape)
    # Give the traced module real values: the host variables and fresh rng streams.
    # ToNNX holds the variables by module path, the collections merged.
    by_path = traverse_util.unflatten_dict({**traverse_util.flatten_dict(variables["params"]),
                                            **traverse_util.flatten_dict(variables["batch_stats"])})
    state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
    nnx.replace_by_pure_dict(state, by_path)
    nnx.update(model, state)
    model.to_nnx__rngs = nnx.Rngs(params=0, dropout=1)
    assert model.stem["conv"]["kernel"].get_metadata()["out_sharding"] == (None, None, "conv_in", "conv_out")

    x = images(shape)

    def both(model, variables, x):
        """Eval logits of each, then a training-mode call of each that updates the batch statistics."""
        logits = model(x, train=False), module.apply(variables, x, train=False)
        model(x, train=True, mutable=["batch_stats"])
        return logits, module.apply(variables, x, train=True, mutable=["batch_stats"])[1]

    (ours, linen), updates = nnx.jit(both)(model, variables, x)
    np.testing.assert_allclose(ours, linen, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(model.stem["norm"]["mean"].get_value(), updates["batch_stats"]["stem"]["norm"]["mean"],
                               rtol=1e-5, atol=1e-6)
