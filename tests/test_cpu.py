"""net/cpu.py: the fused path's C++ kernels on a CPU, each op held to the modules it replaces in float64, the whole
model through the start-up check (and a sabotaged kernel refused), its masks the GPU path's, its sums the same on
any number of threads."""
import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import train_here

from engine.config import Config, resolve
from engine.convs import check_fused, choose_fused
from engine.device import setup_env
from net import build_model, cpu

pytestmark = pytest.mark.skipif(bool(cpu.available()), reason=cpu.available() or "the C++ kernels build")


@pytest.fixture
def cpu_path(monkeypatch):
    """The fused path on a CPU is the C++ kernels, not Triton's interpreter (which the test processes choose)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def relative_error(got, want):
    return ((got.double() - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("c, m, dilation, shape", [
    (32, 1, 2, (2, 8, 8)), (20, 2, 3, (1, 7, 9)), (24, 1, 5, (3, 12, 11)),
    (3, 2, 4, (2, 1, 3)),  # C -> 2C with no whole vector block, on a map smaller than the dilation
    (12, 1, 5, (1, 4, 2)),  # the input gradient's scalar tail (C not a multiple of 8); every side tap outside
    (40, 2, 2, (2, 5, 6)),  # 80 outputs: the weight gradient's blocks at o = 0 and 32, then a 16-wide tail
    (17, 1, 3, (1, 1, 1)),  # one pixel: only the centre tap
    (8, 2, 1, (1, 2, 9)),  # exactly one input-gradient block of C -> 2C
])
def test_depthwise_conv_is_f_conv2d_forward_and_both_gradients(c, m, dilation, shape):
    # vector blocks of 8 and 16 channels with their tails, and maps narrower than the dilated kernel
    n, h, w = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, h, w, c, dtype=torch.float64, generator=gen)
    weight = torch.randn(c * m, 1, 3, 3, dtype=torch.float64, generator=gen)
    dy = torch.randn(n, h, w, c * m, dtype=torch.float64, generator=gen)

    def run(conv, x, weight):
        x, weight = x.clone().requires_grad_(), weight.clone().requires_grad_()
        y = conv(x, weight)
        return (y, *torch.autograd.grad(y, (x, weight), dy.to(y.dtype)))

    want = run(lambda x, w: F.conv2d(x.permute(0, 3, 1, 2), w, padding=dilation, dilation=dilation,
                                     groups=c).permute(0, 2, 3, 1), x, weight)
    got = run(lambda x, w: cpu.DepthwiseConv.apply(x, w, dilation), x.float(), weight.float())
    for name, g, r in zip(("output", "input gradient", "weight gradient"), got, want):
        assert g.shape == r.shape and relative_error(g, r) < 1e-5, name


@pytest.mark.parametrize("p, training", [(0.0, True), (0.3, True), (0.0, False)])
def test_batch_norm_act_is_the_modules_with_the_masks(p, training):
    n, h, w, c = 3, 5, 6, 40  # 40 channels: not a multiple of any vector width
    gen = torch.Generator().manual_seed(1)
    y = (torch.randn(n, h, w, c, dtype=torch.float64, generator=gen) * 2 + 0.5)
    da = torch.randn(n, h, w, c, dtype=torch.float64, generator=gen)
    bn = torch.nn.BatchNorm2d(c).double().train(training)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=gen), bn.bias.uniform_(-0.5, 0.5, generator=gen)
        bn.running_mean.uniform_(-1, 1, generator=gen), bn.running_var.uniform_(0.5, 2, generator=gen)
    mask = cpu.dropout_mask(1234, (n, c, h, w), p, layer=5) if p else None

    def reference(bn, y):
        return cpu.reference_layer(y.permute(0, 3, 1, 2), lambda v: v, bn, p, mask).permute(0, 2, 3, 1)

    def kernels(bn, y):
        return cpu.BatchNormAct.apply(y, bn.weight, bn.bias, bn, 1234, 5, p)

    results = []
    for run, dtype in ((reference, torch.float64), (kernels, torch.float32)):
        module = copy.deepcopy(bn).to(dtype)
        yi = y.to(dtype).requires_grad_()
        a = run(module, yi)
        grads = torch.autograd.grad(a, (yi, module.weight, module.bias), da.to(dtype)) if training else ()
        results.append([a, *grads, module.running_mean, module.running_var])
    for name, g, r in zip(("output", "input gradient", "weight gradient", "bias gradient", "running mean",
                           "running var"), *results):
        assert relative_error(g, r) < 1e-5, name
    assert (results[1][0] == 0).float().mean() > 0.3  # ReLU's zeros (and dropout's) are there to test


def test_dropout_masks_are_the_gpu_paths_bit_for_bit():
    pytest.importorskip("triton")
    from net import fused  # the keep bits in Triton's interpreter

    for shape, p, layer, seed in [((2, 64, 8, 8), 0.1, 3, 12345), ((2, 40, 5, 7), 0.5, 0, 2**31 - 2)]:
        keep = cpu.dropout_mask(seed, shape, p, layer=layer)
        assert torch.equal(keep, fused.dropout_mask(seed, shape, p, layer=layer))
        assert abs(keep.float().mean().item() - (1 - p)) < 0.05


def env_on_cpu(**overrides):
    return setup_env(resolve(Config(device="cpu", smoke=True, **overrides)))


def test_the_start_up_check_passes_the_kernels_and_refuses_a_wrong_one(cpu_path, monkeypatch):
    env = env_on_cpu()
    model = build_model(dropout=0.1).to(memory_format=env.memory_format)
    choice = choose_fused(model, env, "auto", batch=2)
    assert model.fused and choice.path == "C++ kernels" and choice.check.failed == [], choice.line()
    assert choice.line().startswith("on, C++ kernels (--fuse auto; checked in fp32")

    build = cpu.kernel

    def sabotaged(name):  # the depthwise weight gradient's partials zeroed after the real kernel
        real = build(name)
        if name != "dw_backward":
            return real
        return lambda *args: (real(*args), args[4].zero_())

    monkeypatch.setattr(cpu, "kernel", sabotaged)
    model = build_model(dropout=0.1)
    choice = choose_fused(model, env, "on", batch=2)
    assert not model.fused and "disagrees with the unfused model, so unfused" in choice.line()
    assert all("grouped" in name or "weight gradient" in name for name in choice.check.failed)


def test_other_widths_sizes_and_a_batch_of_one(cpu_path):
    env = env_on_cpu()
    model = build_model(widths=(8, 24, 48, 96), dropout=0.2)  # tails of every block; C -> 3C: PyTorch's conv
    result = check_fused(model, env, batch=1, size=20)
    assert result.failed == [], result.line()


def test_a_short_run_follows_the_unfused_models_losses(cpu_path):
    # dropout 0, the same initial weights and batch: the losses of 6 SGD steps fitting one batch of 16, fused and
    # unfused
    torch.manual_seed(0)
    model = build_model(dropout=0.0)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 3, 32, 32, generator=gen), torch.randint(0, 10, (16,), generator=gen))] * 6
    losses = {}
    for fused in (False, True):
        net = copy.deepcopy(model)
        net.fused = fused
        optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        losses[fused] = []
        for x, y in batches:
            loss = F.cross_entropy(net(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses[fused].append(loss.item())
    assert losses[True][-1] < losses[True][0]
    for got, want in zip(losses[True], losses[False]):  # fp32 both ways: rounding apart, 1e-4 of the loss
        assert abs(got - want) < 1e-4 * want, (losses[True], losses[False])


def test_the_kernels_sums_are_the_same_on_one_thread_and_two():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 16, 16, 64, generator=gen)
    weight = torch.randn(128, 1, 3, 3, generator=gen)
    bn = torch.nn.BatchNorm2d(128)
    results, threads = [], torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            xi, wi, module = x.clone().requires_grad_(), weight.clone().requires_grad_(), copy.deepcopy(bn)
            a = cpu.BatchNormAct.apply(cpu.DepthwiseConv.apply(xi, wi, 3), module.weight, module.bias, module, 7, 2,
                                       0.1)
            results.append([a, *torch.autograd.grad(a.square().sum(), (xi, wi, module.weight)), module.running_var])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_eval_runs_the_kernels_with_the_running_statistics(cpu_path):
    torch.manual_seed(3)
    model = build_model().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 2)
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
        model.fused = True
        got = model(x)
    assert relative_error(got, want.double()) < 1e-4


def test_a_fused_cpu_run_resumes_to_the_same_weights_bit_for_bit(cpu_path, tmp_path):
    """The trainer on the C++ kernels (--fuse auto on a CPU), dropout on: three steps straight, and one step then
    resumed for two: the same weights to the bit (dropout's seeds come from the generator the checkpoint keeps, the
    kernels' sums are in a fixed order). One thread in both, as a resume keeps the run's count."""
    args = ["--smoke", "--recipe", "seed", "--limit-train", "24", "--batch-size", "8", "--limit-test", "8",
            "--bn-reestimate", "0", "--threads", "1", "--runs", tmp_path]
    r = train_here(*args, "--max-steps", "3", "--name", "whole")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "fused: on, C++ kernels (--fuse auto; checked in fp32 against float64" in r.stdout
    assert train_here(*args, "--max-steps", "1", "--name", "cut").returncode == 0
    r = train_here("--resume", tmp_path / "cut", "--max-steps", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    whole, cut = (torch.load(tmp_path / name / "last.pt", weights_only=True)["model"] for name in ("whole", "cut"))
    for key, value in whole.items():
        assert torch.equal(cut[key], value), key


@pytest.mark.slow  # Dynamo tracing the model: ten seconds
def test_the_fused_forward_is_one_opaque_call_to_torch_compile(cpu_path):
    """The kernels read tensors' memory directly: torch.compile must see the fused forward as one call, not trace
    into it (graph breaks at every kernel, and Dynamo's warnings about cached functions)."""
    model = build_model().to(memory_format=torch.channels_last)
    model.fused = True
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    assert torch._dynamo.explain(model)(x).graph_count == 0  # traced into, it was 15 graphs and 14 breaks
