"""Recipes: typed loading, overrides, and errors that name the file, line, key and value."""

import subprocess
import sys
from pathlib import Path

import pytest

from codegpt.base.recipe_loader import dump_recipe, load_recipe
from codegpt.base.errors import UserError
from codegpt.base.recipe import PretrainRecipe

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def error_of(*args) -> str:
    with pytest.raises(UserError) as info:
        load_recipe(PretrainRecipe, *args)
    return str(info.value)


def test_shipped_70m_recipe_is_the_seeds_run():
    recipe = load_recipe(PretrainRecipe, ROOT / "recipes/pretrain-70m.yaml")
    m, t = recipe.model, recipe.train
    assert (m.n_embd, m.n_head, m.n_layer, m.block_size, m.vocab_size, m.dropout) == (448, 8, 10, 1024, 100352, 0.1)
    assert (t.micro_batch_size, t.batch_tokens, t.max_steps, t.warmup_steps) == (16, 2**19, 5912, 222)
    assert (t.lr, t.min_lr, t.weight_decay) == (6e-4, 6e-5, 0.01)
    assert recipe.data.source == "codeparrot"


def test_tiny_recipe_loads():
    recipe = load_recipe(PretrainRecipe, ROOT / "recipes/pretrain-tiny.yaml")
    assert recipe.data.source == "local" and recipe.model.vocab_size == 100352


def test_typo_in_a_key_names_file_line_and_the_nearest_key(tmp_path):
    path = write(tmp_path, "model:\n  n_layer: 2\n  n_heads: 2\n")
    assert error_of(path) == f"{path}:3: model.n_heads: unknown key (did you mean model.n_head?)"


def test_wrong_type_names_the_value(tmp_path):
    path = write(tmp_path, "train:\n  lr: fast\n")
    assert error_of(path) == f"{path}:2: train.lr: expected float, got 'fast' (str)"


def test_literal_choice_is_checked(tmp_path):
    path = write(tmp_path, "data:\n  source: codeparot\n")
    message = error_of(path)
    assert message.startswith(f"{path}:2: data.source: must be one of 'codeparrot', 'local', 'files'")
    assert "did you mean codeparrot?" in message


def test_impossible_batch_is_refused_before_work(tmp_path):
    path = write(tmp_path, "model:\n  block_size: 256\ntrain:\n  batch_tokens: 1000\n  micro_batch_size: 4\n")
    assert "train.batch_tokens: 1000 is not a multiple of micro_batch_size x block_size" in error_of(path)


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = write(tmp_path, "model:\n  n_layer: 2\n   n_head: [\n")
    assert error_of(path).startswith(f"{path}:3: invalid YAML")


def test_missing_file():
    assert error_of("no/such.yaml") == "no/such.yaml: recipe file not found"


def test_overrides_apply_and_are_typed(tmp_path):
    path = write(tmp_path, "train:\n  lr: 1.0e-3\n")
    recipe = load_recipe(PretrainRecipe, path, ["train.lr=3e-4", "model.n_layer=3", "log.run_name=abc",
                                                "data.paths=[a, b]"])
    assert recipe.train.lr == 3e-4 and recipe.model.n_layer == 3 and recipe.log.run_name == "abc"
    assert recipe.data.paths == ["a", "b"]


def test_bad_override_is_blamed_on_the_command_line(tmp_path):
    path = write(tmp_path, "train:\n  lr: 1.0e-3\n")
    assert error_of(path, ["train.lrr=1"]) == "<command line>: train.lrr: unknown key (did you mean train.lr?)"
    assert error_of(path, ["train.lr=abc"]) == "<command line>: train.lr: expected float, got 'abc' (str)"
    assert error_of(path, ["lr"]) == "<command line>: expected section.key=value, got 'lr'"


def test_recipe_used_round_trips(tmp_path):
    recipe = load_recipe(PretrainRecipe, ROOT / "recipes/pretrain-tiny.yaml", ["train.max_steps=70"])
    dump_recipe(recipe, tmp_path / "recipe.yaml")
    assert load_recipe(PretrainRecipe, tmp_path / "recipe.yaml") == recipe


def test_command_prints_one_line_and_exits_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "codegpt.base.convert", str(tmp_path / "missing"), str(tmp_path / "out")],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr == f"error: {tmp_path / 'missing'}: no such file or directory\n"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_non_finite_numbers_are_refused(tmp_path, value):
    path = write(tmp_path, f"train:\n  warmup_steps: 0\n  lr: {value}\n")
    assert error_of(path).startswith(f"{path}:3: train.lr: must be a finite number, got ")
    assert error_of(None, [f"train.grad_clip={value.lstrip('.-')}"]).startswith(
        "<command line>: train.grad_clip: must be a finite number")


def test_a_binary_recipe_is_refused(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(b"train:\n  lr: \xff\xfe\n")
    assert error_of(path) == f"{path}: not a text recipe (byte 13 is not UTF-8)"


def test_a_key_given_twice_names_both_lines(tmp_path):
    path = write(tmp_path, "train:\n  lr: 1.0e-3\n  max_steps: 5\n  lr: 2.0e-3\n")
    assert error_of(path) == f"{path}:4: train.lr: given twice (lines 2 and 4)"
    path = write(tmp_path, "model:\n  n_layer: 2\ntrain:\n  lr: 1.0e-3\nmodel:\n  n_head: 2\n")
    assert error_of(path) == f"{path}:5: model: given twice (lines 1 and 5)"


@pytest.mark.parametrize("text", ["", "# only a comment\n", "{}\n"])
def test_an_empty_recipe_is_refused_not_run_as_the_70m_defaults(tmp_path, text):
    path = write(tmp_path, text)
    assert error_of(path).startswith(f"{path}: recipe is empty")


def test_a_model_too_big_for_memory_is_refused_with_its_size(tmp_path):
    path = write(tmp_path, "model:\n  n_layer: 2\n")
    message = error_of(path, ["model.n_layer=1000000"])
    assert message.startswith("<command line>: model.n_layer: 1,000,000 makes 2,414,317,417,344 parameters, 8.8 TiB")
    assert "more than this machine's" in message
    path = write(tmp_path, "model:\n  vocab_size: 100000000000\n")
    assert error_of(path).startswith(f"{path}:2: model.vocab_size: 100,000,000,000 makes ")


def test_parameter_count_matches_the_model():
    from codegpt.base.footprint import parameter_count
    from codegpt.base.model import GPT, GPTConfig

    for config in (GPTConfig(), GPTConfig(n_layer=3, n_head=2, n_embd=32, block_size=16, vocab_size=1000, bias=False)):
        assert parameter_count(config) == GPT(config).num_params()
