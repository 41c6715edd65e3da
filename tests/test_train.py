"""The training loop's pieces: the seed's schedule, the optimizers and their weight-decay groups,
batch arithmetic, and a loop that resumes to the same bits with either optimizer (in-process, on an
in-memory batch source)."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from codegpt.base.errors import InvalidValue, UserError
from codegpt.base.model import GPT
from codegpt.base.recipe import LogConfig, PretrainRecipe, TrainConfig, accumulation_steps
from codegpt.base.optimizers import Muon, make_optimizers
from codegpt.base.run_dir import STATE_FILE, RunDirectory
from codegpt.base.train import Trainer, learning_rate, make_accelerator, to_device, validation_sample
from tests.helpers import ListBatches, comparable, losses, tiny_config


def test_schedule_is_linear_warmup_then_cosine_to_min_lr():
    seed = TrainConfig()  # the seed's run
    assert learning_rate(0, seed) == pytest.approx(6e-4 / 222)
    assert learning_rate(221, seed) == pytest.approx(6e-4)
    assert learning_rate(222, seed) == pytest.approx(6e-4)
    midpoint = 222 + (5912 - 222) // 2
    assert learning_rate(midpoint, seed) == pytest.approx((6e-4 + 6e-5) / 2, rel=1e-3)
    assert learning_rate(5912, seed) == pytest.approx(6e-5)
    values = [learning_rate(s, seed) for s in range(222, 5913)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_weight_decay_only_on_matrices():
    model = GPT(tiny_config())
    (optimizer,) = make_optimizers(model, TrainConfig(weight_decay=0.01), torch.device("cpu"))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = GPT(tiny_config(n_layer=2))
    adamw, muon = make_optimizers(model, TrainConfig(optimizer="muon", weight_decay=0.01), torch.device("cpu"))
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, Muon)
    assert muon.param_groups[0]["ns_dtype"] == torch.float32  # bf16 is emulated on CPUs without AVX512-BF16
    names = {id(p): name for name, p in model.named_parameters()}
    on_muon = {names[id(p)] for group in muon.param_groups for p in group["params"]}
    on_adamw = {names[id(p)] for group in adamw.param_groups for p in group["params"]}
    assert on_muon == {f"transformer.h.{i}.{m}.weight" for i in range(2)
                       for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert on_muon.isdisjoint(on_adamw) and on_muon | on_adamw == set(names.values())
    assert {"transformer.wte.weight", "transformer.wpe.weight"} <= on_adamw  # the tied head is wte
    assert muon.param_groups[0]["weight_decay"] == 0.01


def test_muon_is_torchs_muon_with_the_newton_schulz_dtype_ours():
    torch.manual_seed(0)
    shapes = [(48, 96), (96, 32)]
    for dtype in (torch.bfloat16, torch.float32):
        ours = [torch.randn(shape, requires_grad=True) for shape in shapes]
        theirs = [w.detach().clone().requires_grad_() for w in ours]
        optimizers = (Muon(ours, lr=0.02, weight_decay=0.1, ns_dtype=dtype),
                      torch.optim.Muon(theirs, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw"))
        for _ in range(3):
            for a, b in zip(ours, theirs):
                a.grad = torch.randn_like(a)
                b.grad = a.grad.clone()
            for optimizer in optimizers:
                optimizer.step()
        for a, b in zip(ours, theirs):
            if dtype == torch.bfloat16:  # torch's iterations run in bf16: the same operations, the same bits
                assert torch.equal(a, b)
            else:  # float32 iterations differ from bf16 ones by bf16's rounding, not more
                torch.testing.assert_close(a, b, atol=2e-3, rtol=0)
                assert not torch.equal(a, b)


def test_accumulation_follows_batch_tokens_and_world_size():
    seed = TrainConfig()
    assert accumulation_steps(seed, 1024, 1) == 32
    assert accumulation_steps(seed, 1024, 8) == 4
    with pytest.raises(InvalidValue, match="524288 is not a multiple of .* x 3 = 49152") as bad:
        accumulation_steps(seed, 1024, 3)
    assert bad.value.key == "batch_tokens"


def run_loop(out_dir: Path, max_steps=8, wandb="disabled", optimizer="adamw", resume=True):
    train = TrainConfig(batch_tokens=256, micro_batch_size=4, max_steps=max_steps, warmup_steps=2, lr=3e-3,
                        min_lr=3e-4, eval_interval=4, eval_tokens=256, checkpoint_interval=3, keep_checkpoints=2,
                        optimizer=optimizer, resume=resume)
    recipe = PretrainRecipe(out_dir=str(out_dir), model=tiny_config(dropout=0.1), train=train,
                            log=LogConfig(wandb=wandb, log_interval=1))
    torch.manual_seed(0)
    val = ListBatches(seed=1, rows=8)
    accelerator = make_accelerator(train)
    with RunDirectory(out_dir, "pretrain", accelerator) as run_dir:
        trainer = Trainer(GPT(recipe.model), ListBatches(seed=0), lambda: [val.next_batch() for _ in range(2)], train,
                          recipe.log, run_dir, accelerator, recipe, block_size=32)
        return trainer.run()


def checkpoint_dirs(out_dir: Path) -> list[Path]:
    return RunDirectory(out_dir, "pretrain", None).checkpoints()


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_loop_learns_writes_its_run_directory_and_resumes_bit_exactly(tmp_path, optimizer):
    whole = tmp_path / "whole"
    last = run_loop(whole, optimizer=optimizer)
    assert last["step"] == 8 and math.isfinite(last["val_loss"])
    records = losses(whole)
    train_losses = [r["loss"] for r in records if "loss" in r]
    assert train_losses[-1] < train_losses[0]
    assert [p.name for p in checkpoint_dirs(whole)] == ["step-000006", "step-000008"]
    for name in ("recipe.yaml", "run.json", "loss.png", "perplexity.png", "lr.png", "throughput.png", "final"):
        assert (whole / name).exists(), name
    assert json.loads((whole / "run.json").read_text())["git_commit"] is not None

    # As if killed during step 8: the step-8 checkpoint, final/ and the step-8 metrics never happened.
    cut = tmp_path / "cut"
    shutil.copytree(whole, cut)
    shutil.rmtree(cut / "step-000008")
    shutil.rmtree(cut / "final")
    (cut / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records if r["step"] <= 7))
    run_loop(cut, optimizer=optimizer)
    assert (cut / "final/model.safetensors").read_bytes() == (whole / "final/model.safetensors").read_bytes()
    assert [comparable(r) for r in losses(cut)] == [comparable(r) for r in records]


def test_a_checkpoint_from_before_train_optimizer_resumes_to_the_same_bits(tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    run_loop(whole)
    shutil.copytree(whole, cut)
    shutil.rmtree(cut / "step-000008")
    shutil.rmtree(cut / "final")
    # What the version before it wrote: one AdamW state under "optimizer", no train.optimizer key.
    state = torch.load(cut / "step-000006" / STATE_FILE, weights_only=True)
    torch.save({"optimizer": state.pop("optimizers")[0], **state}, cut / "step-000006" / STATE_FILE)
    recipe = (cut / "recipe.yaml").read_text()
    (cut / "recipe.yaml").write_text("\n".join(l for l in recipe.splitlines() if "optimizer:" not in l) + "\n")
    run_loop(cut)
    assert (cut / "final/model.safetensors").read_bytes() == (whole / "final/model.safetensors").read_bytes()


def test_muon_under_fp16_loss_scaling_is_refused_naming_the_key(tmp_path):
    train = TrainConfig(batch_tokens=128, micro_batch_size=4, optimizer="muon")
    accelerator = make_accelerator(train)
    accelerator.scaler = torch.amp.GradScaler("cpu")  # what fp16 on a GPU has
    recipe = PretrainRecipe(out_dir=str(tmp_path), model=tiny_config(), train=train, log=LogConfig(wandb="disabled"))
    with pytest.raises(UserError, match="^train.optimizer: muon steps two optimizers, which fp16 loss scaling"):
        Trainer(GPT(recipe.model), ListBatches(seed=0), lambda: [], train, recipe.log,
                RunDirectory(tmp_path, "pretrain", accelerator), accelerator, recipe, block_size=32)
    assert not any(tmp_path.iterdir())


def test_resuming_with_another_optimizer_is_refused_before_anything_is_written(tmp_path):
    run_loop(tmp_path, max_steps=3)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match=r"recipe.yaml:\d+: train.optimizer is adamw in the run, muon now"):
        run_loop(tmp_path, max_steps=4, optimizer="muon")
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_wandb_offline_logs_without_a_key_or_network(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    run_loop(tmp_path / "run", max_steps=2, wandb="offline")
    runs = list((tmp_path / "run/wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


class MaskedBatches(ListBatches):
    """Batches whose rows carry very different numbers of labelled targets (the rest -100), as
    packed SFT rows do."""

    def __init__(self, seed, labelled, **kwargs):
        super().__init__(seed, **kwargs)
        self.labelled = labelled  # labelled targets per row of each batch, cycling

    def next_batch(self):
        x, y = super().next_batch()
        keep = self.labelled[(self.cursor // self.batch - 1) % len(self.labelled)]
        y = y.clone()
        y[:, keep:] = -100
        return x, y


def per_token_mean(model, batches):
    """The mean loss over every labelled target of `batches`, from the model's per-batch means."""
    total = count = 0.0
    for x, y in batches:
        n = (y != -100).sum().item()
        total += model(x, y).double().item() * n
        count += n
    return total / count


def test_losses_and_the_gradient_are_per_token_means_over_the_step(tmp_path):
    """A micro-batch with few labelled targets weighs by its targets, not as much as a full one:
    in the logged train loss, in the validation loss, and in the step's gradient."""
    train = TrainConfig(batch_tokens=256, micro_batch_size=4, max_steps=1, warmup_steps=0, lr=1e-2, min_lr=1e-3,
                        grad_clip=0.0, eval_interval=1, eval_tokens=256, checkpoint_interval=100)
    recipe = PretrainRecipe(out_dir=str(tmp_path), model=tiny_config(), train=train,
                            log=LogConfig(wandb="disabled", log_interval=1))
    torch.manual_seed(0)
    model = GPT(recipe.model)
    reference = GPT(recipe.model)
    reference.load_state_dict(model.state_dict())
    step_batches = [b for source in [MaskedBatches(seed=0, labelled=[32, 2])] for b in
                    (source.next_batch(), source.next_batch())]
    val_batches = [b for source in [MaskedBatches(seed=1, rows=8, labelled=[1, 32])] for b in
                   (source.next_batch(), source.next_batch())]
    accelerator = make_accelerator(train)
    with RunDirectory(tmp_path, "pretrain", accelerator) as run_dir:
        trainer = Trainer(model, MaskedBatches(seed=0, labelled=[32, 2]), lambda: iter(val_batches), train, recipe.log,
                          run_dir, accelerator, recipe, block_size=32)
        last = trainer.run()

    expected_train = per_token_mean(reference, step_batches)
    assert last["loss"] == pytest.approx(expected_train, rel=1e-5)
    (optimizer,) = make_optimizers(reference, train, torch.device("cpu"))
    total = sum((y != -100).sum() for _, y in step_batches)
    loss = sum(reference(x, y) * (y != -100).sum() / total for x, y in step_batches)
    loss.backward()
    optimizer.step()
    for (name, got), want in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5, msg=name)
    with torch.no_grad():
        assert last["val_loss"] == pytest.approx(per_token_mean(model.eval(), val_batches), rel=1e-5)


def test_a_checkpoint_is_never_written_with_non_finite_weights(tmp_path):
    """Position 20 is never used by 16-token rows: its NaN leaves the loss finite, and only the
    checkpoint would carry it."""
    train = TrainConfig(batch_tokens=128, micro_batch_size=8, max_steps=2, warmup_steps=0, lr=1e-3, min_lr=1e-4,
                        eval_interval=100, eval_tokens=128, checkpoint_interval=1)
    recipe = PretrainRecipe(out_dir=str(tmp_path), model=tiny_config(), train=train, log=LogConfig(wandb="disabled"))
    model = GPT(recipe.model)
    with torch.no_grad():
        model.transformer.wpe.weight[20] = float("nan")
    accelerator = make_accelerator(train)
    with RunDirectory(tmp_path, "pretrain", accelerator) as run_dir:
        trainer = Trainer(model, ListBatches(seed=0, block=16, batch=8), lambda: [], train, recipe.log, run_dir,
                          accelerator, recipe, block_size=16)
        with pytest.raises(UserError, match=r"^step 1: the weights are not finite \(transformer.wpe.weight\)"):
            trainer.run()
    assert not checkpoint_dirs(tmp_path) and not (tmp_path / "final").exists()


def test_a_restart_removes_what_killed_saves_left_and_nothing_else(tmp_path):
    run = tmp_path / "run"
    run_loop(run, max_steps=3)
    ours = [".step-000006.k3j4h5g6.tmp", ".final.abcd_fgh.tmp", ".recipe.yaml.a1b2c3d4.tmp", ".run.json.zz99abcd.tmp"]
    users = [".mine.tmp", ".step-notes.tmp", ".step-000006.my-copy.tmp", "step-000006.txt", "notes-00001.json"]
    for name in ours[:2]:
        (run / name).mkdir()
        (run / name / "model.safetensors").write_bytes(b"half a checkpoint")
    for name in ours[2:] + users:
        (run / name).write_text("kept?\n")
    run_loop(run, max_steps=4)
    assert not [name for name in ours if (run / name).exists()]
    assert all((run / name).read_text() == "kept?\n" for name in users)


def test_validation_is_the_same_batches_every_time_and_a_split_without_one_is_refused():
    train = TrainConfig(micro_batch_size=4, eval_tokens=8 * 32)
    source = ListBatches(seed=0, rows=12, block=32, batch=4)
    source.rows_per_epoch, source.rewind = 12, lambda: setattr(source, "cursor", 0)
    batches = validation_sample(source, train, block_size=32, world_size=1, where="data.val_fraction")
    first, again = [b[0] for b in batches()], [b[0] for b in batches()]
    assert len(first) == 2 and all(torch.equal(a, b) for a, b in zip(first, again))
    source.rows_per_epoch = 7
    with pytest.raises(UserError, match="^task.val_fraction: the validation split has 7 rows of 32 tokens, fewer "
                                        "than one batch of 4 per process"):
        validation_sample(source, train, block_size=32, world_size=2, where="task.val_fraction")


class CopyRecorder(torch.overrides.TorchFunctionMode):
    """Records the pinning and device copies asked of tensors, and makes them no-ops (this
    machine may have no GPU to copy to)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.pin_memory, torch.Tensor.to):
            self.calls.append((func.__name__, args[1:], kwargs))
            return args[0]
        return func(*args, **kwargs)


def test_batches_go_to_a_gpu_from_pinned_memory_without_blocking_and_stay_as_they_are_on_a_cpu():
    batch = (torch.zeros(2, 8, dtype=torch.long), torch.ones(2, 8, dtype=torch.long))
    cuda = torch.device("cuda")
    with CopyRecorder() as recorder:
        moved = to_device(batch, cuda)
    assert recorder.calls == [("pin_memory", (), {}), ("to", (cuda,), {"non_blocking": True})] * 2
    assert len(moved) == 2
    with CopyRecorder() as recorder:
        to_device(batch, torch.device("cpu"))
    assert recorder.calls == [("to", (torch.device("cpu"),), {})] * 2  # no pinning, a copy the host waits for


def test_a_compiled_run_compiles_its_step_once_and_its_evaluation_once(tmp_path):
    """Two evaluations among four steps: two graphs, the training step's and, at the first
    evaluation, the forward without gradients in eval mode (the one recompile, for grad mode);
    nothing after."""
    from torch._dynamo.utils import counters, guard_failures

    torch._dynamo.reset()
    counters.clear()
    guard_failures.clear()
    train = TrainConfig(batch_tokens=128, micro_batch_size=4, max_steps=4, warmup_steps=1, lr=1e-3, min_lr=1e-4,
                        eval_interval=2, eval_tokens=128, checkpoint_interval=100, compile=True, mixed_precision="no")
    recipe = PretrainRecipe(out_dir=str(tmp_path), model=tiny_config(n_layer=1, n_head=2, n_embd=32, dropout=0.1),
                            train=train, log=LogConfig(wandb="disabled", log_interval=1))
    val = ListBatches(seed=1, rows=8)
    accelerator = make_accelerator(train)
    with RunDirectory(tmp_path, "pretrain", accelerator) as run_dir:
        last = Trainer(GPT(recipe.model), ListBatches(seed=0), lambda: [val.next_batch() for _ in range(2)], train,
                       recipe.log, run_dir, accelerator, recipe, block_size=32).run()
    assert last["step"] == 4 and len([r for r in losses(tmp_path) if "val_loss" in r]) == 2
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]
    reasons = [reason for failures in guard_failures.values() for reason in failures]
    assert len(reasons) == 1 and "grad_mode" in str(reasons[0]), reasons
