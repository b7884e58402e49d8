"""The one table of config fields: every field has a default and a help line, and the table keeps
every field a run written by an earlier jaxlm recorded."""

import dataclasses
import json
import os

from jaxlm import config as config_lib
from jaxlm.models.config import ModelConfig

HERE = os.path.dirname(os.path.abspath(__file__))


def test_every_model_field_is_in_the_table_with_its_dataclass_default():
    for field in dataclasses.fields(ModelConfig):
        key = f"model.{field.name}"
        assert key in config_lib.FIELDS, key
        if field.name != "vocab_size":  # 0 in a config: "take the tokenizer's"
            assert config_lib.FIELDS[key][0] == field.default, key


def test_every_field_has_help():
    empty = [k for k, (_, text) in config_lib.FIELDS.items() if not text.strip()]
    assert not empty, empty


def test_the_table_keeps_every_field_of_an_earlier_run():
    with open(os.path.join(HERE, "data", "run_v0_1", "config.json")) as f:
        saved = config_lib.flatten_dict(json.load(f))
    missing = sorted(set(saved) - set(config_lib.flatten(config_lib.base_config())))
    assert not missing, missing


def test_help_config_shows_a_recipes_values():
    recipe = config_lib.load_recipe("configs/csv_classification.py", {"steps": "77"})
    text = config_lib.describe_fields(recipe)
    lines = {line.split()[0]: line for line in text.splitlines()}
    assert "'classification'" in lines["task"]
    assert " 77 " in lines["steps"]
    assert "global gradient norm clip" in lines["optim.clip_norm"]
    defaults = config_lib.describe_fields().splitlines()
    assert defaults[0].split()[:2] == ["task", "'causal_lm'"] and " 1000 " in defaults[2]
