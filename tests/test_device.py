"""engine/device.py: the device set-up, and the compile check that decides compiled or eager."""
import dataclasses
import os

import pytest
import torch

from engine.config import Config, resolve
from engine.device import Env, compile_checked, setup_env
from net import build_model

CPU = Env(device=torch.device("cpu"))


def test_cpu_env_is_fp32_eager_with_threads_on_the_idle_cores():
    threads = torch.get_num_threads()
    try:
        env = setup_env(resolve(Config(device="cpu")))
        assert env.device.type == "cpu" and env.dtype == torch.float32 and not env.ddp and env.master
        assert 1 <= env.threads <= len(os.sched_getaffinity(0)) and env.dali_threads == 1
        assert "idle at start" in env.threads_why
        assert env.memory_format == torch.channels_last and env.precision_and_layout == "fp32 channels_last"
        nchw = setup_env(resolve(Config(device="cpu", channels_last=False)))  # --no-channels-last
        assert nchw.memory_format == torch.contiguous_format and nchw.precision_and_layout == "fp32 NCHW"
        with env.autocast():  # a no-op context on CPU
            assert not torch.is_autocast_enabled()
        env = setup_env(resolve(Config(device="cpu", threads=1)))
        assert env.threads == 1 == torch.get_num_threads() and "--threads given" in env.threads_why
    finally:
        torch.set_num_threads(threads)


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


def test_an_nchw_run_compiles_with_inductors_layout_optimisation_off():
    import torch._inductor.config as inductor

    own_choice, seen = inductor.layout_optimization, []

    class Recording(torch.nn.Module):  # the setting in force at each call: where the real graphs compile
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            seen.append((inductor.layout_optimization, x.is_contiguous()))
            return self.model(x)

    nchw = dataclasses.replace(CPU, memory_format=torch.contiguous_format)  # --no-channels-last
    check = compile_checked(build_model(), nchw, eval_batch=4, train_batch=2, compiler=lambda m, **kw: Recording(m))
    assert check.compiled and seen == [(False, True), (False, True)]  # both graphs, NCHW batches, layout pinned
    assert inductor.layout_optimization == own_choice  # put back after the check
    seen.clear()
    compile_checked(build_model(), CPU, eval_batch=4, train_batch=2, compiler=lambda m, **kw: Recording(m))
    assert seen == [(own_choice, False), (own_choice, False)]  # channels_last: Inductor's own choice


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
@pytest.mark.parametrize("convs", ["torch", "triton"])
def test_compile_check_on_cuda_builds_exactly_the_two_graphs_and_accepts_inductor(convs):
    from engine.convs import choose_convs

    env = setup_env(resolve(Config(device="cuda")))
    model = build_model().to(env.device, memory_format=torch.channels_last)
    assert set(choose_convs(model, env, convs, batch=512).impl.values()) == {convs}
    check = compile_checked(model, env, eval_batch=1000, train_batch=512)
    assert check.compiled, check.note
    assert check.graphs == 2 and check.error <= 2 * check.eager_error + 1e-4 and check.eager_error > 0
