"""Checkpoints: our format round-trips; nanoGPT, build-nanogpt and Hugging Face GPT-2 weights load
with equal logits; our model exports to Hugging Face; nothing is ever unpickled unsafely."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from codegpt.base.checkpoint import load_model, save_model

from codegpt.base.convert import export_hf, load_any

from codegpt.base.provenance import weights_hash
from codegpt.base.errors import UserError
from codegpt.base.model import GPT
from tests.helpers import tiny_config
from tests.nanogpt_reference import GPTConfig as PickledConfig
from tests.nanogpt_reference import ReferenceGPT

ROOT = Path(__file__).resolve().parent.parent
transformers = pytest.importorskip("transformers")


def max_diff(a, b):
    return (a - b).abs().max().item()


def test_save_load_round_trip_is_exact(tmp_path, tiny_model):
    save_model(tmp_path / "ckpt", tiny_model, meta={"note": "test"})
    loaded = load_model(tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["config.json", "model.safetensors"]
    document = json.loads((tmp_path / "ckpt/config.json").read_text())
    assert document["format"] == "codegpt" and document["tokenizer"] == "cl100k_base"
    assert document["model"]["n_embd"] == 64 and document["provenance"] == {"note": "test"}
    for (name, a), (_, b) in zip(tiny_model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert weights_hash(loaded.state_dict()) == weights_hash(tiny_model.state_dict())


def test_a_saved_model_is_readable_as_any_new_file_is(tmp_path, tiny_model):
    """The atomic writers' temporaries are private (0600 files, 0700 directories); the model that
    appears under its final name gets the modes a plain new file and directory get here."""
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain/file").write_text("x")
    save_model(tmp_path / "ckpt", tiny_model)
    mode = lambda path: os.stat(path).st_mode & 0o777
    assert mode(tmp_path / "ckpt") == mode(tmp_path / "plain")
    assert mode(tmp_path / "ckpt/config.json") == mode(tmp_path / "ckpt/model.safetensors") == mode(tmp_path / "plain/file")


def test_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, tiny_model):
    save_model(tmp_path / "ckpt", tiny_model)
    before = (tmp_path / "ckpt/model.safetensors").read_bytes()

    def crash(_):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_model(tmp_path / "ckpt", GPT(tiny_config()), extra=crash)
    assert (tmp_path / "ckpt/model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_interrupted_replacement_is_recovered(tmp_path, tiny_model):
    save_model(tmp_path / "ckpt", tiny_model)
    os.replace(tmp_path / "ckpt", tmp_path / "ckpt.old")  # as if killed between the two renames
    assert load_model(tmp_path / "ckpt").config == tiny_model.config


def test_shape_mismatch_names_the_tensor(tmp_path, tiny_model):
    save_model(tmp_path / "ckpt", tiny_model)
    document = json.loads((tmp_path / "ckpt/config.json").read_text())
    document["model"]["n_embd"] = 128
    (tmp_path / "ckpt/config.json").write_text(json.dumps(document))
    with pytest.raises(UserError, match=r"transformer\.\S+ has shape"):
        load_model(tmp_path / "ckpt")


@pytest.mark.parametrize("flavour", ["nanogpt", "build-nanogpt"])
def test_nanogpt_checkpoints_import_with_equal_logits(tmp_path, flavour):
    torch.manual_seed(0)
    approximate = "none" if flavour == "nanogpt" else "tanh"
    reference = ReferenceGPT(approximate=approximate).eval()
    # torch.compile'd models save their weights under `_orig_mod.`; the mask buffers come along.
    state = {f"_orig_mod.{k}": v for k, v in reference.state_dict().items()}
    if flavour == "nanogpt":
        checkpoint = {"model": state, "optimizer": {}, "iter_num": 5, "best_val_loss": torch.tensor(2.0),
                      "model_args": dict(n_layer=2, n_head=4, n_embd=64, block_size=32, bias=True,
                                         vocab_size=512, dropout=0.0),
                      "config": {"batch_size": 12, "learning_rate": 6e-4}}
    else:
        checkpoint = {"model": state, "config": PickledConfig(), "step": 5, "val_loss": 2.0}
    torch.save(checkpoint, tmp_path / "ckpt.pt")
    model = load_any(tmp_path / "ckpt.pt").eval()
    assert model.config.activation == ("gelu" if flavour == "nanogpt" else "gelu_tanh")
    idx = torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        assert max_diff(model(idx), reference(idx)) < 1e-4


def test_pickled_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("touch pwned",))

    torch.save({"model": {}, "x": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="refusing to unpickle"):
        load_any(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


def hf_model():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=512, n_positions=32, n_embd=64, n_layer=2, n_head=4,
                                     activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.05)
    return model


@pytest.mark.parametrize("safe", [True, False])
def test_hugging_face_gpt2_imports_with_equal_logits(tmp_path, safe):
    reference = hf_model()
    reference.save_pretrained(tmp_path / "hf", safe_serialization=safe)
    model = load_any(tmp_path / "hf").eval()
    idx = torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        assert max_diff(model(idx), reference(idx).logits) < 1e-4


@pytest.mark.parametrize("activation,bias", [("gelu_tanh", True), ("gelu", False)])
def test_export_loads_in_transformers_with_equal_logits(tmp_path, activation, bias):
    torch.manual_seed(0)
    model = GPT(tiny_config(activation=activation, bias=bias)).eval()
    export_hf(model, tmp_path / "hf")
    exported = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        assert max_diff(exported(idx).logits, model(idx)) < 1e-4


def test_convert_command_round_trips_through_hugging_face(tmp_path, tiny_model):
    save_model(tmp_path / "ours", tiny_model)

    def convert(*args):
        result = subprocess.run([sys.executable, "-m", "codegpt.base.convert", *map(str, args)],
                                capture_output=True, text=True, cwd=ROOT)
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert "(codegpt) ->" in convert(tmp_path / "ours", tmp_path / "hf", "--to", "hf")
    assert "(hf) ->" in convert(tmp_path / "hf", tmp_path / "back")
    back = load_model(tmp_path / "back")
    assert weights_hash(back.state_dict()) == weights_hash(tiny_model.state_dict())


def git(*args, cwd):
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.parametrize("tracked", [False, True])
def test_provenance_records_the_commit_of_the_code_not_of_an_enclosing_repository(tmp_path, tracked):
    """A copy of the code inside another project's repository (untracked there) records no commit;
    code that the repository holds records its commit."""
    import shutil

    outer = tmp_path / "project"
    code = outer / "vendor/codegpt"
    shutil.copytree(ROOT / "base", code / "base", ignore=shutil.ignore_patterns("__pycache__"))
    git("init", "-q", cwd=outer)
    (outer / "notes.txt").write_text("the enclosing project\n")
    git("add", "notes.txt", *(["vendor"] if tracked else []), cwd=outer)
    git("commit", "-q", "-m", "project", cwd=outer)
    run_dir = outer / "runs"
    run_dir.mkdir()
    # The copy's own provenance module (it imports nothing of ours), not the installed one.
    probe = "from provenance import provenance; print(provenance()['git_commit'])"
    result = subprocess.run([sys.executable, "-c", probe], cwd=run_dir, capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": str(code / "base")})
    assert result.stdout.strip() == (git("rev-parse", "HEAD", cwd=outer) if tracked else "None")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_weights_stored_in_half_precision_load(tmp_path, tiny_model, dtype):
    """Any floating dtype stands for any other: the weights are cast to the model's on load."""
    save_model(tmp_path / "ckpt", tiny_model.to(dtype))
    loaded = load_model(tmp_path / "ckpt")
    tiny_model.float()
    for (name, a), (_, b) in zip(tiny_model.state_dict().items(), loaded.state_dict().items()):
        assert b.dtype == torch.float32 and torch.allclose(a, b, atol=1e-2), name


def test_integer_weights_are_refused_naming_the_tensor_and_its_dtype(tmp_path, tiny_model):
    """An int32 tensor used to be cast to float without a word and the model sampled garbage; an
    integer buffer of the model itself (active_ids, the ids a model trained over) still loads."""
    from safetensors.torch import load_file, save_file

    save_model(tmp_path / "ckpt", tiny_model)
    weights = tmp_path / "ckpt/model.safetensors"
    state = load_file(weights)
    state["transformer.h.1.mlp.c_fc.weight"] = state["transformer.h.1.mlp.c_fc.weight"].to(torch.int32)
    save_file(state, weights)
    with pytest.raises(UserError, match=r"ckpt: transformer\.h\.1\.mlp\.c_fc\.weight is int32; the model's "
                                        r"transformer\.h\.1\.mlp\.c_fc\.weight is floating point"):
        load_model(tmp_path / "ckpt")

    torch.manual_seed(0)
    restricted = GPT(tiny_config(active_vocab=3))
    restricted.active_ids.copy_(torch.tensor([5, 7, 11]))
    save_model(tmp_path / "restricted", restricted)
    assert load_model(tmp_path / "restricted").active_ids.tolist() == [5, 7, 11]
    state = load_file(tmp_path / "restricted/model.safetensors")
    save_file({**state, "active_ids": state["active_ids"].float()}, tmp_path / "restricted/model.safetensors")
    with pytest.raises(UserError, match=r"active_ids is float32; the model's active_ids is integer \(int64\)"):
        load_model(tmp_path / "restricted")
