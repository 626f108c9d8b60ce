"""engine/loop.py on CPU: the optimizer and schedule of a recipe, train_epoch (the loop train.py runs
and the bench times), the weights' moving average, BatchNorm re-estimation and evaluation.

The loop does not care which model it trains: most tests here give it a one-conv stand-in that
steps in milliseconds. The CNN itself learning is train.py's shared run (tests/test_train.py).
"""
import pytest
import torch

from engine.config import Config, resolve
from engine.device import Env, setup_env
from engine.loop import EMA, NonFiniteLoss, evaluate, make_optimizer, make_schedule, reestimate_batchnorm, train_epoch
from net import build_model
from pipelines import make_loader, synthetic_cifar

CPU = Env(device=torch.device("cpu"))


def tiny_model():
    """Conv, BatchNorm, Dropout, global average pool, linear: every kind of layer the loop treats apart."""
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.Dropout(0.05), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                               torch.nn.Linear(8, 10))


def smoke_setup(n=64, batch=16, model=None, **overrides):
    """The smoke recipe on `n` synthetic images: (cfg, model, optimizer, schedule, loader)."""
    cfg = resolve(Config(smoke=True, batch_size=batch, **overrides))
    loader = make_loader(*synthetic_cifar(n), batch_size=batch, train=True, device="cpu")
    model = (model or tiny_model()).to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, model)
    return cfg, model, optimizer, make_schedule(cfg, optimizer, len(loader)), loader


# --- train_epoch ------------------------------------------------------------------------------

def test_train_epoch_runs_every_step_and_logs_on_log_steps():
    cfg, model, optimizer, schedule, loader = smoke_setup(n=80)  # 5 steps of 16
    logged = []
    totals = train_epoch(model, optimizer, loader, CPU, schedule=schedule, log_every=2,
                         log=lambda step, m: logged.append((step, m)))
    assert totals["steps"] == 5 and totals["images"] == 80 and totals["end"] == 5
    assert [s for s, _ in logged] == [0, 2, 4]  # every 2nd step, and the last
    assert all(0 <= m["acc"] <= 1 and m["loss"] > 0 and m["img_per_s"] > 0 for _, m in logged)
    assert 0 < totals["loss_sum"] / totals["images"] < 5 and 0 <= totals["correct"] <= 80
    assert schedule.scheduler.last_epoch == 5  # stepped once per step


def test_train_epoch_learns():
    cfg, model, optimizer, schedule, loader = smoke_setup(n=128, epochs=5, warmup_epochs=0.5)
    losses = []
    for epoch in range(5):
        loader.set_epoch(epoch)
        t = train_epoch(model, optimizer, loader, CPU, schedule=schedule, label_smoothing=cfg.label_smoothing)
        losses.append(t["loss_sum"] / t["images"])
    assert losses[-1] < 0.8 * losses[0]


def test_train_epoch_stops_at_stop_at_and_on_request():
    cfg, model, optimizer, schedule, loader = smoke_setup(n=96)  # 6 steps
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
    cfg, model, optimizer, schedule, loader = smoke_setup(n=96)
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
    """The learning rate of every step of a run, stepped as train_epoch steps it."""
    optimizer = make_optimizer(cfg, tiny_model())
    schedule = make_schedule(cfg, optimizer, steps_per_epoch)
    out = []
    for _ in range(cfg.epochs * steps_per_epoch):
        out.append(schedule.lr)
        optimizer.step()
        schedule.after_step()
    return out


def test_onecycle_warms_up_then_decays_to_zero():
    cfg = resolve(Config(epochs=4, warmup_epochs=1.0, device="cpu"))
    lr = lrs(cfg, 10)
    assert lr[0] == pytest.approx(0.1 * cfg.lr) and max(lr) == pytest.approx(cfg.lr) and lr.index(max(lr)) == 10
    assert lr[-1] == pytest.approx(cfg.lr / 30)  # one step before the end of the linear decay


def test_a_warm_up_longer_than_the_run_is_shortened_and_said():
    cfg = resolve(Config(epochs=1, warmup_epochs=2.0, device="cpu"))
    note = make_schedule(cfg, make_optimizer(cfg, tiny_model()), 20).note
    assert "the 2-epoch warm-up (40 steps) would fill most of this 20-step run: warming up over 2 steps" in note
    lr = lrs(cfg, 20)
    assert lr.index(max(lr)) == 2 and lr[-1] < 0.1 * cfg.lr  # it decays within the run
    cfg = resolve(Config(device="cpu"))
    assert make_schedule(cfg, make_optimizer(cfg, tiny_model()), 97).note is None  # the recipe itself: no note


def test_plateau_steps_per_epoch_on_the_test_loss_and_onecycle_per_step():
    cfg = resolve(Config(recipe="seed", device="cpu"))
    schedule = make_schedule(cfg, make_optimizer(cfg, tiny_model()), 10)
    assert not schedule.per_step and schedule.total == 63 * 10
    schedule.after_step()  # a per-epoch schedule ignores steps
    for loss in [1.0] + [2.0] * 4:  # 4 epochs without a gain (patience 3): halved
        schedule.after_eval(loss)
    assert schedule.lr == cfg.lr / 2
    cfg = resolve(Config(device="cpu"))
    schedule = make_schedule(cfg, make_optimizer(cfg, tiny_model()), 10)
    before = schedule.lr
    schedule.after_eval(5.0)  # a per-step schedule ignores evaluations
    assert schedule.per_step and schedule.lr == before


def test_max_steps_ends_the_schedule():
    cfg = resolve(Config(epochs=10, max_steps=15, warmup_epochs=0.0, device="cpu"))
    lr = lrs(cfg, 10)  # warm-up 0 means one step at 0.1x, then the decay over the 14 left
    assert lr[1] == pytest.approx(cfg.lr) and lr[14] == pytest.approx(cfg.lr / 14) and lr[15:] == [0] * 85


def test_weight_decay_skips_batchnorm_and_biases():
    cfg = resolve(Config(device="cpu"))
    decay, rest = make_optimizer(cfg, build_model()).param_groups  # the CNN: its BN and biases are 1-d
    assert decay["weight_decay"] == 5e-4 and all(p.ndim > 1 for p in decay["params"])
    assert rest["weight_decay"] == 0 and all(p.ndim == 1 for p in rest["params"])


def test_adamw_decays_the_weights_apart_from_the_gradient_and_adam_adds_it_to_it():
    model = torch.nn.Linear(2, 2, bias=False)
    for name, kind in (("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)):
        optimizer = make_optimizer(resolve(Config(device="cpu", optimizer=name, lr=0.1, weight_decay=0.5)), model)
        assert type(optimizer) is kind and optimizer.param_groups[0]["weight_decay"] == 0.5
    w = model.weight.detach().clone()
    model.weight.grad = torch.zeros_like(w)  # no loss gradient: what moves the weights is the decay alone
    optimizer.step()  # AdamW: w * (1 - lr * decay), whatever Adam's moments make of a zero gradient
    torch.testing.assert_close(model.weight.detach(), w * (1 - 0.1 * 0.5))


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
    schedule = make_schedule(cfg, optimizer, len(loader))
    for epoch in range(2):  # the second epoch starts with a pipeline reset
        totals = train_epoch(model, optimizer, SyncGuarded(loader), env, schedule=schedule,
                             label_smoothing=cfg.label_smoothing, log_every=cfg.log_every)
        assert totals["steps"] == 8


# --- BatchNorm re-estimation and evaluation --------------------------------------------------------

def test_batchnorm_reestimation_averages_over_the_loader_and_leaves_the_rest():
    _, model, _, _, loader = smoke_setup(n=64)
    bn = model[1]
    bn.running_mean.fill_(100.0)  # statistics that lag the weights, as after a short run
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "batches" not in k}
    eval_loader = make_loader(*synthetic_cifar(64), batch_size=16, train=False, device="cpu")
    reestimate_batchnorm(model, eval_loader, CPU)
    with torch.no_grad():
        x = torch.cat([x for x, _ in eval_loader])
        features = model[0](x)
    torch.testing.assert_close(bn.running_mean, features.mean((0, 2, 3)), rtol=1e-4, atol=1e-4)
    assert bn.momentum == 0.1 and model.training  # put back as they were
    for key, value in weights.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_evaluate_counts_every_image_once_into_the_confusion_matrix():
    images, labels = synthetic_cifar(50)
    loader = make_loader(images, labels, batch_size=16, train=False, device="cpu")  # 16, 16, 16, 2
    model = tiny_model().eval()
    loss, acc, confusion = evaluate(model, loader, CPU)
    assert confusion.shape == (10, 10) and confusion.sum() == 50
    assert confusion.sum(1).tolist() == torch.bincount(torch.as_tensor(labels), minlength=10).tolist()  # rows: true
    assert acc == confusion.diag().sum().item() / 50 and loss > 0
    with torch.no_grad():
        logits = model.eval()(torch.cat([x for x, _ in loader]))
    assert acc == pytest.approx((logits.argmax(1) == torch.as_tensor(labels)).float().mean().item())


# --- the weights' moving average (--ema) ------------------------------------------------------------

def test_the_average_warms_up_then_moves_by_one_minus_decay_per_step():
    model = tiny_model()
    ema = EMA(model, decay=0.99)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].num_batches_tracked.fill_(7)
    ema.update()  # update 1: decay min(0.99, 2/11): mostly the new weights
    w = 2 / 11
    torch.testing.assert_close(ema.model[0].weight, w * start["0.weight"] + (1 - w) * model[0].weight)
    assert ema.model[1].num_batches_tracked.item() == 7  # an integer buffer is copied, not averaged
    for _ in range(1000):
        ema.update()
    assert min(0.99, 1001 / 1010) == 0.99 and ema.updates == 1001
    torch.testing.assert_close(ema.model[0].weight, model[0].weight)  # a constant is its own average
    assert not any(p.requires_grad for p in ema.model.parameters()) and not ema.model.training


def test_the_average_is_updated_every_step_and_saved_and_restored_whole():
    cfg, model, optimizer, schedule, loader = smoke_setup(n=64)
    ema = EMA(model, decay=0.9)
    train_epoch(model, optimizer, loader, CPU, schedule=schedule, ema=ema)
    assert ema.updates == 4
    assert not torch.equal(ema.model[0].weight, model[0].weight)  # an average, not a copy
    again = EMA(tiny_model(), decay=0.9)
    again.load_state_dict(ema.state_dict())
    assert again.updates == 4 and all(torch.equal(a, b) for a, b in zip(again.model.state_dict().values(),
                                                                        ema.model.state_dict().values()))


def test_flip_tta_averages_the_logits_of_each_image_and_its_mirror():
    images, labels = synthetic_cifar(32)
    loader = make_loader(images, labels, batch_size=16, train=False, device="cpu")
    model = tiny_model().eval()
    _, acc, _ = evaluate(model, loader, CPU, tta=True)
    with torch.no_grad():
        x = torch.cat([x for x, _ in loader])
        logits = (model.eval()(x) + model(x.flip(3))) / 2
    assert acc == pytest.approx((logits.argmax(1) == torch.as_tensor(labels)).float().mean().item())

