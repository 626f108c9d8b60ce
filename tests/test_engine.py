"""net/engine.py on CPU: the loop train.py runs and the bench times, its schedule, checkpoints, Ctrl-C."""
import ast
import io
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from net import build_model
from net.engine import (Config, Env, NonFiniteLoss, StopSignal, UserError, compile_checked, git_commit, setup_env,
                        load_checkpoint, make_optimizer, make_scheduler, resolve, save_checkpoint, train_epoch, warmup_steps)
from pipelines import make_loader, synthetic_cifar

ROOT = Path(__file__).resolve().parents[1]
CPU = Env(device=torch.device("cpu"))


def smoke_setup(n=64, batch=16, **overrides):
    """The smoke recipe on `n` synthetic images: (cfg, model, optimizer, scheduler, loader)."""
    cfg = resolve(Config(smoke=True, batch_size=batch, **overrides))
    loader = make_loader(*synthetic_cifar(n), batch_size=batch, train=True, device="cpu")
    model = build_model(dropout=cfg.dropout).to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, model)
    return cfg, model, optimizer, make_scheduler(cfg, optimizer, len(loader)), loader


# --- train_epoch ------------------------------------------------------------------------------

def test_train_epoch_runs_every_step_and_logs_on_log_steps():
    cfg, model, optimizer, scheduler, loader = smoke_setup(n=80)  # 5 steps of 16
    logged = []
    totals = train_epoch(model, optimizer, loader, CPU, scheduler=scheduler, log_every=2,
                         log=lambda step, m: logged.append((step, m)))
    assert totals["steps"] == 5 and totals["images"] == 80 and totals["end"] == 5
    assert [s for s, _ in logged] == [0, 2, 4]  # every 2nd step, and the last
    assert all(0 <= m["acc"] <= 1 and m["loss"] > 0 and m["img_per_s"] > 0 for _, m in logged)
    assert 0 < totals["loss_sum"] / totals["images"] < 5 and 0 <= totals["correct"] <= 80
    assert scheduler.last_epoch == 5  # stepped once per step


def test_train_epoch_learns():
    cfg, model, optimizer, scheduler, loader = smoke_setup(n=128, epochs=3, warmup_epochs=0.5)
    losses = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        t = train_epoch(model, optimizer, loader, CPU, scheduler=scheduler, label_smoothing=cfg.label_smoothing)
        losses.append(t["loss_sum"] / t["images"])
    assert losses[-1] < 0.8 * losses[0]


def test_train_epoch_stops_at_stop_at_and_on_request():
    cfg, model, optimizer, scheduler, loader = smoke_setup(n=96)  # 6 steps
    assert train_epoch(model, optimizer, loader, CPU, stop_at=2)["end"] == 2

    class StopAfterTwo:  # what StopSignal looks like to the loop
        calls = 0

        @property
        def requested(self):
            self.calls += 1
            return self.calls >= 2

    loader.set_epoch(1, skip=1)  # a resumed epoch: numbered from its first new step
    totals = train_epoch(model, optimizer, loader, CPU, start=1, stop=StopAfterTwo())
    assert (totals["steps"], totals["end"], totals["images"]) == (2, 3, 32)


def test_non_finite_loss_names_the_step():
    cfg, model, optimizer, scheduler, loader = smoke_setup(n=96)
    forward, calls = model.forward, []

    def poisoned(x):  # NaN logits from the 4th step on
        calls.append(1)
        return forward(x) * (float("nan") if len(calls) >= 4 else 1.0)

    model.forward = poisoned
    with pytest.raises(NonFiniteLoss) as e:
        train_epoch(model, optimizer, loader, CPU, log_every=25)  # found at the next log step: the last
    assert e.value.step == 3


# --- the recipe's parts ---------------------------------------------------------------------------

def lrs(cfg, steps_per_epoch):
    model = build_model()
    optimizer = make_optimizer(cfg, model)
    scheduler = make_scheduler(cfg, optimizer, steps_per_epoch)
    out = []
    for _ in range(cfg.epochs * steps_per_epoch):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_onecycle_warms_up_then_decays_to_zero():
    cfg = resolve(Config(epochs=4, warmup_epochs=1.0, device="cpu"))
    lr = lrs(cfg, 10)
    assert lr[0] == pytest.approx(0.1 * cfg.lr) and max(lr) == pytest.approx(cfg.lr) and lr.index(max(lr)) == 10
    assert lr[-1] == pytest.approx(cfg.lr / 30)  # one step before the end of the linear decay


def test_a_warm_up_longer_than_the_run_is_shortened_and_said():
    cfg = resolve(Config(epochs=1, warmup_epochs=2.0, device="cpu"))
    steps, note = warmup_steps(cfg, 20)
    assert steps == 2 and "warm-up" in note
    lr = lrs(cfg, 20)
    assert lr.index(max(lr)) == 2 and lr[-1] < 0.1 * cfg.lr  # it decays within the run
    assert warmup_steps(resolve(Config(device="cpu")), 97)[1] is None  # the recipe itself: no note


def test_max_steps_ends_the_schedule():
    cfg = resolve(Config(epochs=10, max_steps=15, warmup_epochs=0.0, device="cpu"))
    lr = lrs(cfg, 10)  # warm-up 0 means one step at 0.1x, then the decay over the 14 left
    assert lr[1] == pytest.approx(cfg.lr) and lr[14] == pytest.approx(cfg.lr / 14) and lr[15:] == [0] * 85


def test_weight_decay_skips_batchnorm_and_biases():
    cfg = resolve(Config(device="cpu"))
    decay, rest = make_optimizer(cfg, build_model()).param_groups
    assert decay["weight_decay"] == 5e-4 and all(p.ndim > 1 for p in decay["params"])
    assert rest["weight_decay"] == 0 and all(p.ndim == 1 for p in rest["params"])


def test_seed_recipe_is_the_original_design():
    cfg = resolve(Config(recipe="seed", device="cpu"))
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.batch_size, cfg.epochs) == ("adam", 1e-3, 1e-4, 128, 63)


def test_resolve_fills_device_compile_and_log_every():
    cfg = resolve(Config(device="cpu"))
    assert (cfg.device, cfg.compile, cfg.log_every) == ("cpu", False, 1)
    assert cfg.name.endswith("-fast") and cfg.epochs == 15


def test_compile_uses_static_shapes(monkeypatch):
    seen = {}

    def fake_compile(model, **kwargs):
        seen.update(kwargs)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    check = compile_checked(build_model(), CPU, eval_batch=4, train_batch=2, mode="max-autotune")
    assert seen == {"mode": "max-autotune", "dynamic": False}
    assert check.compiled and check.error == check.eager_error == 0


def test_compile_check_builds_both_graphs_the_trainer_needs_and_leaves_the_model_as_it_was():
    model = build_model(dropout=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()

    def dynamo_only(m, **kwargs):  # Dynamo's graphs without Inductor: seconds on CPU, not minutes
        return torch.compile(m, backend="eager", **kwargs)

    check = compile_checked(model, CPU, eval_batch=8, train_batch=4, compiler=dynamo_only)
    assert check.compiled and check.graphs == 2 and check.note is None and check.seconds > 0
    assert check.error <= 1e-4
    for key, value in model.state_dict().items():  # weights and BN statistics: untouched by the check's step
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    assert all(p.grad is None for p in model.parameters()) and model.training
    assert torch.equal(torch.get_rng_state(), rng)
    with torch.no_grad():  # the trainer's two shapes run the graphs built: no third one
        check.model.eval()(torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last))
    check.model.train()(torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)).sum().backward()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2 and check.graphs == 2


def test_a_compiler_that_raises_means_eager_with_a_note():
    def broken(m, **kwargs):
        raise RuntimeError("Inductor fell over\nwith a long story")

    model = build_model()
    check = compile_checked(model, CPU, eval_batch=4, train_batch=2, compiler=broken)
    assert not check.compiled and check.model is model
    assert check.note == "torch.compile failed (RuntimeError: Inductor fell over); training eager"


class Wrong(torch.nn.Module):
    """A 'compiled' model whose eval output is off by 5%: what a miscompiled conv looks like."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(x)
        return out * 1.05 if not self.model.training else out


def test_a_compiled_model_that_disagrees_means_eager():
    model = build_model()
    check = compile_checked(model, CPU, eval_batch=4, train_batch=2, compiler=lambda m, **kw: Wrong(m))
    assert not check.compiled and check.model is model and check.error > 0.04
    assert "disagrees with eager" in check.note


def test_a_compiled_training_step_that_is_not_finite_means_eager():
    class NaNInTraining(Wrong):
        def forward(self, x):
            out = self.model(x)
            return out * float("nan") if self.model.training else out

    model = build_model()
    check = compile_checked(model, CPU, eval_batch=4, train_batch=2, compiler=lambda m, **kw: NaNInTraining(m))
    assert not check.compiled and "non-finite" in check.note
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.cuda
def test_compile_check_on_cuda_builds_exactly_the_two_graphs_and_accepts_inductor():
    env = setup_env(resolve(Config(device="cuda")))
    model = build_model().to(env.device, memory_format=torch.channels_last)
    check = compile_checked(model, env, eval_batch=1000, train_batch=512)
    assert check.compiled, check.note
    assert check.graphs == 2 and check.error <= 2 * check.eager_error + 1e-4 and check.eager_error > 0


class SyncGuarded:
    """A loader whose batches between the first and the last step run under sync debug mode "error"."""

    def __init__(self, loader):
        self.loader = loader

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        try:
            for i, batch in enumerate(self.loader):  # the fetch of batch i runs under the mode set at i - 1
                torch.cuda.set_sync_debug_mode("error" if 0 < i < len(self) - 1 else "default")
                yield batch
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
def test_train_epoch_does_not_sync_the_host_between_log_steps():
    cfg = resolve(Config(device="cuda", batch_size=64, log_every=1000))  # log steps: the first and the last
    env = setup_env(cfg)
    loader = make_loader(*synthetic_cifar(64 * 8), batch_size=64, train=True, device="cuda", dtype=env.dtype)
    model = build_model(dropout=cfg.dropout).to(env.device, memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, model)
    scheduler = make_scheduler(cfg, optimizer, len(loader))
    for epoch in range(2):  # the second epoch starts with a pipeline reset
        totals = train_epoch(model, optimizer, SyncGuarded(loader), env, scheduler=scheduler,
                             label_smoothing=cfg.label_smoothing, log_every=cfg.log_every)
        assert totals["steps"] == 8


# --- checkpoints ----------------------------------------------------------------------------------

def test_checkpoint_round_trip_is_atomic(tmp_path):
    cfg, model, optimizer, scheduler, _ = smoke_setup()
    ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng_cpu": torch.get_rng_state(), "state": {"epoch": 1}, "config": vars(cfg)}
    save_checkpoint(ckpt, tmp_path / "last.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary left behind
    build_model().load_state_dict(load_checkpoint(tmp_path / "last.pt")["model"])


class Boom:
    def __reduce__(self):
        return (os.system, ("echo owned",))


@pytest.mark.parametrize("content, message", [
    (b"", "is empty (0 bytes)"),
    (os.urandom(512), "not a readable torch.save file"),
    (pickle.dumps({"model": Boom()}), "not a readable torch.save file"),
    (None, "not a checkpoint of this project"),
    ("code", "objects other than tensors"),
])
def test_bad_checkpoints_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "last.pt"
    if content is None:
        torch.save({"weights": torch.zeros(2)}, path)  # a real torch file, not ours
    elif content == "code":
        torch.save({"model": Boom()}, path)  # would run os.system if unpickled without weights_only
    else:
        path.write_bytes(content)
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    assert message in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)
    assert "without --resume" in str(e.value)  # and the way out


# --- Ctrl-C -------------------------------------------------------------------------------------

def test_first_signal_asks_to_stop_and_says_so():
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    out = io.StringIO()
    try:
        stop = StopSignal(out=out)
        stop.arm()
        os.kill(os.getpid(), signal.SIGINT)
        deadline = time.monotonic() + 10
        while not stop.requested and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stop.requested and stop.exit_code == 130
        assert "stopping after this step (Ctrl-C again to quit now)" in out.getvalue()
    finally:
        signal.set_wakeup_fd(-1)
        for s, handler in old.items():
            signal.signal(s, handler)


WATCHED = """
import sys, time, torch
from net.engine import StopSignal
stop = StopSignal()
if sys.argv[1] == "armed":
    stop.arm()
print("ready", flush=True)
a = torch.randn(1500, 1500)
while True:  # long C++ calls, as in a CPU backward pass: Python's own handlers would wait for them
    torch.linalg.eigvals(a)
"""


@pytest.mark.parametrize("armed", [True, False])
def test_signals_quit_at_once_when_there_is_nothing_to_wait_for(armed):
    proc = subprocess.Popen([sys.executable, "-c", WATCHED, "armed" if armed else "loading"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    for _ in range(2 if armed else 1):  # armed: the second one quits; loading: the first
        proc.send_signal(signal.SIGINT)
        time.sleep(0.2)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    if armed:
        assert "stopping after this step" in err and "quitting now; the last checkpoint is kept" in err
    else:
        assert "interrupted before training; nothing saved" in err
    assert "Traceback" not in err


# --- one engine, two users ----------------------------------------------------------------------

def test_nothing_imports_the_train_script():
    for path in [*ROOT.glob("*.py"), *ROOT.glob("[!.]*/**/*.py")]:
        if ".venv" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) else []
            assert "train" not in names, f"{path} imports train.py"


def test_trainer_and_bench_run_the_same_train_epoch():
    import bench.bench
    import net.engine

    assert bench.bench.train_epoch is net.engine.train_epoch
    tree = ast.parse((ROOT / "train.py").read_text())
    defined = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "net.engine"
                for a in n.names}
    assert {"train_epoch", "evaluate"} <= imported and not {"train_epoch", "train_step", "evaluate"} & defined


def test_results_name_the_commit_and_say_when_the_code_differs_from_it(tmp_path):
    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                              capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "model.py").write_text("width = 32\n")
    (tmp_path / "results.md").write_text("| 1 |\n")
    git("add", ".")
    git("commit", "-qm", "first")
    commit = git("rev-parse", "--short", "HEAD")
    assert git_commit(tmp_path) == commit
    (tmp_path / "results.md").write_text("| 2 |\n")  # the bench rewrites its results: still the same code
    assert git_commit(tmp_path) == commit
    (tmp_path / "model.py").write_text("width = 64\n")
    assert git_commit(tmp_path) == commit + "+dirty"
    assert git_commit(tmp_path / "nowhere") is None

