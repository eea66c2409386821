"""config.model is nested: every field of the model, typed; the command line switches models and sets fields."""

import json

import ml_collections
import pytest

from hybrid_jax import list_models, model_info
from hybrid_jax.tasks import check_config
from hybrid_jax.train.config import (
    ConfigError,
    build_model,
    check_keys,
    default_config,
    load_config_file,
    model_changes,
    model_config,
    set_model_fields,
)


def test_model_config_holds_every_field_of_the_variant_with_its_value():
    config = model_config("vit_tiny_patch16_224")
    entry = model_info("vit_tiny_patch16_224")
    assert config.name == "vit_tiny_patch16_224"
    assert config.embed_dim == entry.fields["embed_dim"] == 192 and config.depth == 12
    assert "num_classes" not in config and "dtype" not in config  # the run decides those
    assert model_changes(config) == ("vit_tiny_patch16_224", {})
    assert model_changes(model_config("vit_tiny_patch16_224", depth=6)) == ("vit_tiny_patch16_224", {"depth": 6})


def test_every_registered_model_round_trips_through_its_config_and_json():
    for name in list_models():
        config = model_config(name)
        assert model_changes(config) == (name, {}), name
        # config.json gives tuples back as lists; they still mean "unchanged".
        assert model_changes(json.loads(config.to_json())) == (name, {}), name


def test_fields_are_typed_including_those_the_variant_leaves_none():
    config = default_config()
    config.model = model_config("vit_tiny_patch16_224")
    with pytest.raises(TypeError):
        config.model.depth = "deep"
    set_model_fields(config, {"layer_scale": "1e-5", "depth": "6"})  # layer_scale is None in the variant
    assert model_changes(config.model)[1] == {"layer_scale": 1e-5, "depth": 6}
    model = build_model(config.model, num_classes=3)
    assert (model.layer_scale, model.depth, model.num_classes) == (1e-5, 6, 3)


def test_a_new_name_takes_the_new_models_fields_and_carries_changed_ones_it_shares():
    config = default_config()
    config.model = model_config("vit_tiny_patch16_224", drop_path_rate=0.1, depth=6)
    set_model_fields(config, {"name": "resnet18", "layers": "(1, 1, 1, 1)"})
    name, changes = model_changes(config.model)
    # depth is not a ResNet field and is dropped; drop_path_rate is carried; layers is set after the switch.
    assert (name, changes) == ("resnet18", {"drop_path_rate": 0.1, "layers": (1, 1, 1, 1)})


@pytest.mark.parametrize("assignments, message", [
    ({"dept": "3"}, "model 'vit_tiny_patch16_224' has no field 'dept'.*Did you mean depth"),
    ({"depth": "six"}, "--config.model.depth=six: depth takes int values"),
    ({"name": "vit_tiny"}, "unknown model 'vit_tiny'. Did you mean"),
])
def test_command_line_model_mistakes_are_named(assignments, message):
    config = default_config()
    config.model = model_config("vit_tiny_patch16_224")
    with pytest.raises(ConfigError, match=message):
        set_model_fields(config, assignments)


def test_the_old_string_form_and_removed_keys_say_the_new_spelling():
    config = ml_collections.ConfigDict({**default_config().to_dict(), "model": "resnet18"})  # e.g. an old run's
    with pytest.raises(ConfigError, match=r"model_config\('resnet18'\).*--config.model.name=resnet18"):
        check_keys(config)
    config = default_config()
    config.model_overrides = "depth=2"
    with pytest.raises(ConfigError, match="no longer exists: set model fields one by one: --config.model.FIELD"):
        check_keys(config)


def test_a_model_config_with_another_models_fields_is_refused():
    config = ml_collections.ConfigDict(model_config("vit_tiny_patch16_224").to_dict())
    config.name = "resnet18"
    with pytest.raises(ConfigError, match="model 'resnet18' has no field .*'depth'.*model_config\\('resnet18'\\)"):
        build_model(config)


def test_tasks_are_chosen_by_name_and_check_their_own_settings():
    config = default_config()
    config.task = "detection"
    with pytest.raises(ConfigError, match="config.task='detection'; choose one of \\('classification', 'reid'\\)"):
        check_config(config)
    config = default_config()
    config.task, config.batch_size = "reid", 30
    with pytest.raises(ConfigError, match="multiple of config.reid.images_per_identity"):
        check_config(config)
    config.task = "classification"
    check_config(config)  # the re-ID rule is re-ID's alone


def test_a_config_file_is_read_with_its_argument_and_a_missing_one_is_named(tmp_path):
    path = tmp_path / "two_sizes.py"
    path.write_text("from hybrid_jax.train.config import default_config\n\n"
                    "def get_config(arg):\n    c = default_config()\n"
                    "    c.batch_size = 32 if arg == 'small' else 256\n    return c\n")
    assert load_config_file(f"{path}:small").batch_size == 32
    assert load_config_file(path).batch_size == 256
    with pytest.raises(ConfigError, match="no config file at .*missing.py"):
        load_config_file(tmp_path / "missing.py")
