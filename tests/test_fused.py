"""net/fused.py: the fused path (`Net.fused`) against the unfused model, both held to the unfused model in float64.

PyTorch's own fp32 path is up to ~6e-3 off float64 on this net's early-layer gradients (BatchNorm's backward
cancels large terms, and twelve layers amplify it), so two correct fp32 paths can differ by ~1e-2: each is
measured against float64, and the fused path's error may be at most about twice the unfused path's
(../shared/NOTES-FUSION.md). The kernels run in Triton's interpreter here (conftest.py), on tiny maps; the tests
marked `cuda` run them built, at batch 64 and 32x32, fp32 and bf16, with and without dropout (`make gpu-check`
runs those first)."""
import copy
import functools
import math

import pytest
import torch
import torch.nn.functional as F

from net import build_model, kernels

pytestmark = pytest.mark.skipif(not kernels.HAVE_TRITON, reason="needs Triton (pip install -e '.[test]')")
interpreted = pytest.mark.skipif(not kernels.interpreting(), reason="the interpreter's tests (a GPU machine builds)")
built = pytest.mark.skipif(kernels.interpreting(), reason="TRITON_INTERPRET=1: Triton builds nothing in this process")
if kernels.HAVE_TRITON:
    from net import fused
    from net.fused import draw_seeds, dropout_mask, masked_reference


def fused_copy(model):
    model = copy.deepcopy(model)
    model.fused = True
    return model


def step(model, x, labels, autocast=False, run=None):
    """One forward and backward: (output, {parameter: gradient}, {buffer: value after the step})."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = run(model, x) if run else model(x)
        F.cross_entropy(out.float(), labels).backward()
    return (out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()},
            {n: b.detach().clone() for n, b in model.named_buffers()})


def error(got, want, floor=0.0):
    """Worst absolute error over the tensor, relative to its largest float64 value (or to `floor`, if larger)."""
    return ((got.double() - want).abs().max() / max(want.abs().max().item(), floor)).item()


def assert_within_twice_the_unfused_error(fused_result, unfused_result, reference, buffer_tolerance=None):
    """Output, every gradient and every running statistic of the fused path within twice the unfused path's error
    against float64 (plus 1e-5 for the rounding of values that float64 and fp32 both hold exactly). A gradient
    that is 0 in exact arithmetic is measured against a hundredth of the largest: the gamma of a BatchNorm ahead
    of a ReLU and the next conv's BatchNorm, which divides its scale out while beta is 0 (at init). The running
    statistics are held to `buffer_tolerance` instead, where given."""
    (out, grads, buffers), (out_u, grads_u, buffers_u), (out_r, grads_r, buffers_r) = (fused_result, unfused_result,
                                                                                       reference)
    assert error(out, out_r) <= 2 * error(out_u, out_r) + 1e-5
    floor = max(g.abs().max().item() for g in grads_r.values()) / 100
    for name, want in grads_r.items():
        mine, theirs = error(grads[name], want, floor), error(grads_u[name], want, floor)
        assert mine <= 2 * theirs + 1e-5, f"{name}: fused {mine:.2e}, unfused {theirs:.2e} against float64"
    for name, want in buffers_r.items():
        if name.endswith("num_batches_tracked"):
            assert buffers[name] == want == buffers_u[name], name
        else:
            bound = buffer_tolerance or 2 * error(buffers_u[name], want) + 1e-5
            assert error(buffers[name], want) <= bound, name


@functools.cache
def data(batch, seed=0, size=6):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=gen).contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, 10, (batch,), generator=gen)


@interpreted
def test_a_training_step_matches_the_unfused_model_odd_batch():
    """Dropout 0: output, every gradient, the running statistics and batch counts after a step, at batch 3."""
    torch.manual_seed(1)
    model = build_model(dropout=0.0)
    x, labels = data(3)
    reference = step(copy.deepcopy(model).double(), x.double(), labels)
    assert_within_twice_the_unfused_error(step(fused_copy(model), x, labels), step(copy.deepcopy(model), x, labels),
                                          reference)


@interpreted
def test_eval_uses_the_running_statistics_and_no_dropout():
    torch.manual_seed(2)
    model = build_model(dropout=0.3)
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):  # statistics a run would hold
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    x, _ = data(2)
    with torch.no_grad():
        reference = copy.deepcopy(model).double().eval()(x.double())
        unfused, got = model.eval()(x), fused_copy(model).eval()(x)
    assert error(got, reference) <= 2 * error(unfused, reference) + 1e-5


@interpreted
def test_dropout_is_the_unfused_model_with_the_masks_of_dropout_mask_on_one_image():
    """The seeds the fused forward draws first, from the same generator state, give masks that the unfused layers
    apply (`masked_reference`): the same function, every gradient and statistic alike."""
    torch.manual_seed(3)
    model, p = build_model(dropout=0.2), 0.2
    x, labels = data(1)
    torch.manual_seed(4)
    seeds = draw_seeds(12, "cpu")

    def masked(m, x):
        return masked_reference(m, x, seeds, p)

    reference = step(copy.deepcopy(model).double(), x.double(), labels, run=masked)
    unfused = step(copy.deepcopy(model), x, labels, run=masked)
    torch.manual_seed(4)
    got = step(fused_copy(model), x, labels)
    assert_within_twice_the_unfused_error(got, unfused, reference)


# --- dropout's masks ----------------------------------------------------------------------------------------

@interpreted
def test_the_masks_keep_1_minus_p_independently_per_channel_position_image_layer_and_seed():
    """What dropout needs of a mask, with binomial bounds (5 sigma): the keep rate per channel, per position, per
    image, per seed and per layer; no correlation between neighbours along each axis, between images, layers or
    seeds (steps); words past the channels hold no bits."""
    p, n, c, h, w = 0.25, 4, 40, 8, 8  # 40 channels: a second word, partly used
    masks = {seed: dropout_mask(seed, (n, c, h, w), p).float() for seed in (1, 2)}
    other_layer = dropout_mask(1, (n, c, h, w), p, layer=3).float()
    keep = masks[1]

    def within_binomial(rates, count):
        sigma = math.sqrt(p * (1 - p) / count)
        return (rates - (1 - p)).abs().max().item() < 5 * sigma

    assert within_binomial(keep.mean((0, 2, 3)), n * h * w)  # per channel
    assert within_binomial(keep.mean((0, 1)).flatten(), n * c)  # per position
    assert within_binomial(keep.mean((1, 2, 3)), c * h * w)  # per image
    for other in (masks[2], other_layer):
        assert within_binomial(other.mean().view(1), keep.numel())

    def correlation(a, b):
        a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
        return (a * b).mean() / (a.std() * b.std())

    bound = 5 / math.sqrt(keep.numel() / 2)
    for a, b in ((keep[:, :-1], keep[:, 1:]), (keep[..., :-1, :], keep[..., 1:, :]), (keep[..., :-1], keep[..., 1:]),
                 (keep[:-1], keep[1:]), (keep, masks[2]), (keep, other_layer)):
        assert abs(correlation(a, b)) < bound
    seeds = torch.tensor([1])
    words = fused.keep_bits(seeds, 0, p, n, c, h, w)
    assert words.shape == (n, h, w, 2) and (words[..., 1] >> 8).eq(0).all()  # channels 40..63 do not exist


@interpreted
def test_a_mask_is_the_same_whatever_the_tile_or_the_way_that_draws_it(monkeypatch):
    """Small tiles (several programs an image) and the GPU's way of making words (a bit at a time, where the
    interpreter makes all 32 at once): the same bits."""
    want = dropout_mask(7, (2, 40, 5, 3), 0.3)
    monkeypatch.setattr(fused, "interpreted_tile", lambda kind, extent: {k: 4 for k in extent})
    assert torch.equal(dropout_mask(7, (2, 40, 5, 3), 0.3), want)
    monkeypatch.setattr(fused, "_narrow_bits", True)
    assert torch.equal(dropout_mask(7, (2, 40, 5, 3), 0.3), want)


# --- each op against its definition, in float64 -------------------------------------------------------------

def op_reference(kind, y_prev, s, t, keep, weight, dilation=None):
    """What fused op `kind` computes, in plain torch (float64 in the tests): a = relu(s y + t) * keep, then the
    conv (outputs and their sum and sum of squares per channel) or the pooled mean."""
    a = F.relu(y_prev * s[:, None, None] + t[:, None, None])
    a = a if keep is None else a * keep
    if kind == "pool":
        return (a.mean((2, 3)),)
    if kind == "dw":  # weight: (9, C_out), tap-major
        w = weight.t().reshape(-1, 1, 3, 3)
        y = F.conv2d(a, w, padding=dilation, dilation=dilation, groups=y_prev.shape[1])
    else:
        y = F.conv2d(a, weight[:, :, None, None])
    return y, y.sum((0, 2, 3)), y.square().sum((0, 2, 3))


def op_inputs(kind, n, c_in, c_out, size, dtype, p, device, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen)

    y_prev = rand(n, c_in, size, size).to(dtype).contiguous(memory_format=torch.channels_last)
    s, t = rand(c_in).abs() + 0.5, rand(c_in) * 0.5
    weight = {"dw": rand(9, c_out), "pw": rand(c_out, c_in).to(dtype), "pool": None}[kind]
    keep = fused.keep_bits(torch.tensor([seed + 1]).to(device), 0, p, n, c_in, size, size) if p else \
        torch.empty(0, dtype=torch.int32)
    mask = dropout_mask(seed + 1, (n, c_in, size, size), p, device) if p else None
    move = [y_prev, s, t, weight]
    return [x if x is None else x.to(device) for x in move] + [keep.to(device), mask]


def assert_op_matches_its_definition(kind, *, n, c_in, c_out, size, dtype, p, device, dilation=2, tolerance):
    """The op's outputs, and the gradients its backward returns for random output gradients (through the
    statistics too), against `op_reference` in float64 on the same (rounded) inputs, relative to the largest."""
    y_prev, s, t, weight, keep, mask = op_inputs(kind, n, c_in, c_out, size, dtype, p, device)
    leaves = [y_prev, s, t] + ([weight] if weight is not None else [])
    got_in = [x.detach().requires_grad_() for x in leaves]
    ref_in = [x.detach().double().requires_grad_() for x in leaves]
    if kind == "dw":
        got = fused.fused_dw_op(*got_in[:3], keep, got_in[3], dilation)
        want = op_reference(kind, *ref_in[:3], mask, ref_in[3], dilation)
    elif kind == "pw":
        got = fused.fused_pw_op(*got_in[:3], keep, got_in[3])
        want = op_reference(kind, *ref_in[:3], mask, ref_in[3])
    else:
        got = (fused.fused_pool_op(*got_in[:3], keep),)
        want = op_reference(kind, *ref_in[:3], mask, None)
    gen = torch.Generator().manual_seed(5)
    cotangents = [torch.randn(w.shape, generator=gen).to(device) for w in want]
    grads = torch.autograd.grad(got, got_in, [c.to(g.dtype) for c, g in zip(cotangents, got)])
    ref_grads = torch.autograd.grad(want, ref_in, [c.double() for c in cotangents])
    names = ["output", "sum", "sum of squares"][:len(got)] + ["grad y_prev", "grad s", "grad t", "grad weight"]
    for name, a, b in zip(names, [*got, *grads], [*want, *ref_grads]):
        assert a.shape == b.shape, name
        assert error(a, b) <= tolerance, f"{kind} {dtype} p={p}: {name} off by {error(a, b):.2e}"
    assert got[0].dtype == y_prev.dtype and grads[0].dtype == y_prev.dtype
    if kind != "pool":
        assert got[0].is_contiguous(memory_format=torch.channels_last)


OPS = [("dw", 6, 6, 1), ("dw", 6, 12, 2), ("pw", 8, 12, None), ("pool", 8, 8, None)]  # kind, c_in, c_out, dilation


@interpreted
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("kind, c_in, c_out, dilation", OPS)
def test_each_op_forward_and_backward_matches_its_definition(kind, c_in, c_out, dilation, p):
    """Channel tails (6, 12: not whole words or blocks), dilation 1 and 2, grouped and depthwise, with and
    without dropout: fp32 in the interpreter."""
    assert_op_matches_its_definition(kind, n=2, c_in=c_in, c_out=c_out, size=5, dtype=torch.float32, p=p,
                                     device="cpu", dilation=dilation or 1, tolerance=1e-5)


@interpreted
@pytest.mark.slow  # a batch past Triton's tensor limit: 2-8 s a case in the interpreter
@pytest.mark.parametrize("kind, c_in, c_out, dilation", [("dw", 128, 256, 4), ("pw", 256, 256, None)])
def test_each_op_past_tritons_tensor_limit_in_the_interpreter(kind, c_in, c_out, dilation):
    """Batch 5 at 32x32: 5,120 positions x 256 channels, past Triton's 2^20 elements a tensor, which a tile of all
    the positions (the interpreter's) exceeded; its tiles are now capped there and the kernels loop over the rest."""
    assert 5 * 32 * 32 * c_out > fused.MAX_NUMEL
    assert_op_matches_its_definition(kind, n=5, c_in=c_in, c_out=c_out, size=32, dtype=torch.float32, p=0.3,
                                     device="cpu", dilation=dilation or 1, tolerance=1e-5)


CUDA_OPS = [("dw", 128, 256, 4), ("dw", 256, 256, 5), ("dw", 32, 32, 2), ("pw", 256, 256, None),
            ("pw", 32, 32, None), ("pool", 256, 256, None)]


@pytest.mark.cuda
@built
@pytest.mark.parametrize("p", [0.0, 0.05])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind, c_in, c_out, dilation", CUDA_OPS)
def test_on_cuda_each_op_matches_its_definition_at_batch_64(kind, c_in, c_out, dilation, dtype, p):
    """Built for the GPU, autotuned, at the model's shapes: the bf16 tl.dot path of the 1x1 kernels (tl.trans
    included), which the interpreter never takes, against float64."""
    assert_op_matches_its_definition(kind, n=64, c_in=c_in, c_out=c_out, size=32, dtype=dtype, p=p, device="cuda",
                                     dilation=dilation or 1, tolerance=1e-4 if dtype == torch.float32 else 2e-2)


@pytest.mark.cuda
@built
@pytest.mark.parametrize("precision", ["fp32", "run"])
def test_on_cuda_a_whole_step_matches_the_unfused_model_at_batch_64(precision):
    """The start-up check itself (engine/convs.check_fused) at batch 64, 32x32, dropout 0 and the recipe's: in fp32
    each tensor within twice the unfused path's error; in bf16 (autocast, as the run) the same rule, with bf16's
    larger errors."""
    from engine.convs import check_fused
    from engine.device import Env, bf16_autocast

    env = Env(device=torch.device("cuda"), autocast=bf16_autocast, dtype=torch.bfloat16)
    torch.manual_seed(0)
    model = build_model(dropout=0.05).cuda().to(memory_format=torch.channels_last)
    check = check_fused(model, env, batch=64, precision=precision)
    assert check.failed == [], check.line()
    assert any(k.startswith("dropout 0.05") for k in check.errors)


# --- the ops as torch sees them --------------------------------------------------------------------------------

def op_args(p=0.25, seed=3):
    torch.manual_seed(8)
    y = torch.randn(2, 4, 5, 6).contiguous(memory_format=torch.channels_last).requires_grad_()
    s, t = torch.randn(4, requires_grad=True), torch.randn(4, requires_grad=True)
    keep = fused.keep_bits(torch.tensor([seed]), 0, p, 2, 4, 5, 6)
    return {"dw": (y, s, t, keep, torch.randn(9, 8, requires_grad=True), 2),
            "pw": (y, s, t, keep, torch.randn(6, 4, requires_grad=True)), "pool": (y, s, t, keep)}


@interpreted
def test_the_ops_pass_torch_library_opcheck():
    """Every check opcheck has (schema, autograd registration, fake tensors, AOT dispatch static and dynamic) on
    every fused op. Its AOT check differentiates the sum of each output, so the statistics' gradients arrive
    expanded (stride 0): the kernels once read them as if contiguous, past the end of a one-element storage."""
    ops = {"dw": fused.fused_dw_op, "pw": fused.fused_pw_op, "pool": fused.fused_pool_op}
    for kind, args in op_args().items():
        torch.library.opcheck(ops[kind], args)
    torch.library.opcheck(fused.keep_bits_op, (torch.tensor([5, 6]), 1, 0.25, 2, 40, 3, 4))


@interpreted
def test_expanded_gradients_give_what_contiguous_ones_do():
    """The smallest case of what opcheck found: the gradient of y.sum() reaches the backward as a stride-0 expand."""
    y, s, t, keep, weight, dilation = op_args()["dw"]
    out = fused.fused_dw_op(y, s, t, keep, weight, dilation)
    ones = [torch.ones(()).expand_as(o) for o in out]  # what autograd hands the backward for o.sum()
    expanded = torch.autograd.grad(out, (y, s, t, weight), ones, retain_graph=True)
    contiguous = torch.autograd.grad(out, (y, s, t, weight), [o.contiguous() for o in ones])
    for a, b in zip(expanded, contiguous):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@interpreted
@pytest.mark.long  # Dynamo and AOTAutograd tracing the fused model: a quarter of a minute
def test_a_compiled_fused_step_with_dynamic_shapes_builds_once_for_two_batch_sizes():
    """torch.compile(dynamic=True) through AOTAutograd (the aot_eager backend: the ops' fake implementations and
    their symbolic batch, the keep bits' shape ints included): one graph serves a training step at batch 2 and at
    batch 3, each output what the eager model gives from the same random state."""
    torch.manual_seed(9)
    model = fused_copy(build_model(dropout=0.1, widths=(8, 16, 16, 16)))
    torch._dynamo.reset()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = torch.compile(model, backend="aot_eager", dynamic=True, fullgraph=True)
    for batch in (2, 3):
        x, labels = data(batch, size=4)
        torch.manual_seed(10)
        got, grads, _ = step(compiled, x, labels)
        assert all(g.abs().sum() > 0 for g in grads.values() if g.dim() > 1)  # the backward ran through the ops
        torch.manual_seed(10)
        with torch.no_grad():
            torch.testing.assert_close(got, model(x))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 1


def test_no_launch_has_a_grid_or_an_offset_past_cudas_limits_at_any_batch(monkeypatch):
    """At batch 100,000 (meta tensors: nothing is allocated), every launch of a fused step and of the unfused Triton
    convs: grid axis 0 below 2^31, axes 1 and 2 at most 65,535 (CUDA's caps), every int argument a 32-bit int (the
    offsets past it are each image's 64-bit base)."""
    from bench.roofline import step_launches

    monkeypatch.setattr(kernels, "interpreting", lambda: False)  # the CUDA launchers
    monkeypatch.setattr(fused, "interpreting", lambda: False)
    for variant in ("fused", "triton convs"):
        for layer, direction, launch in step_launches(variant, batch=100_000):
            for tile in launch.tiles:
                grid = tuple(launch.grid(tile)) + (1, 1)
                assert grid[0] < 2**31 and grid[1] <= 65_535 and grid[2] <= 65_535, (layer, launch.name, grid)
                ints = [v for v in launch.args if type(v) is int]
                assert all(-2**31 <= v < 2**31 for v in ints), (layer, launch.name, ints)


@interpreted
def test_bf16_within_twice_the_unfused_bf16_error():
    """Under bf16 autocast, as the trainer runs on a GPU: against float64, the unfused model's own bf16 error (about
    1% on the output, far more on gradients at two 6x6 images a batch) bounds the fused path's."""
    torch.manual_seed(7)
    model = build_model(dropout=0.0)
    x, labels = data(2)
    reference = step(copy.deepcopy(model).double(), x.double(), labels)
    got = step(fused_copy(model), x.to(torch.bfloat16), labels, autocast=True)
    unfused = step(copy.deepcopy(model), x.to(torch.bfloat16), labels, autocast=True)
    assert got[0].dtype == torch.bfloat16 and error(got[0], reference[0]) < 3e-2
    # the statistics of bf16 maps: the interpreter rounds to bf16 by truncation (a GPU to nearest), which moves a
    # mean by up to half a bf16 step, 2e-3 relative, where torch's rounding stays nearer
    assert_within_twice_the_unfused_error(got, unfused, reference, buffer_tolerance=1e-2)


@interpreted
def test_the_state_dict_is_the_unfused_models_both_ways():
    model = build_model()
    fast = fused_copy(model)
    assert fast.state_dict().keys() == model.state_dict().keys()
    fresh = build_model()
    fresh.load_state_dict(fast.state_dict())  # a fused run's checkpoint loads into the unfused model
    x, _ = data(2)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), fast.eval()(x), rtol=1e-5, atol=1e-6)


@interpreted
@pytest.mark.slow  # Dynamo tracing the whole model: ten seconds
def test_torch_compile_sees_the_fused_ops_and_no_graph_break():
    """Dynamo traces the fused forward whole (fullgraph: a graph break raises), the ops opaque; the compiled model
    computes what the eager one does."""
    torch.manual_seed(9)
    model = fused_copy(build_model(dropout=0.0, widths=(8, 16, 16, 16)))  # narrow: the interpreter runs each step
    x, labels = data(2)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    got = step(compiled, x, labels)
    model.zero_grad()
    want = step(model, x, labels)
    torch.testing.assert_close(got[0], want[0])
    for name in want[1]:
        torch.testing.assert_close(got[1]["_orig_mod." + name], want[1][name], msg=name)


def test_the_tiles_autotune_picked_are_reported_by_shape(monkeypatch):
    """What gpu-check prints of the fused kernels' autotune (CUDA only): each key named by AUTOTUNE_KEY, then the
    tensors' dtypes, and the picked tile."""
    class Config:
        kwargs, num_warps = {"BLOCK_P": 16, "BLOCK_C": 32}, 8

    class Tuner:
        cache = {(1024, 32, 256, 5, 1024, 1, True, torch.bfloat16, torch.float32): Config()}

    monkeypatch.setattr(fused, "_autotuners", {"dw_forward": Tuner()})
    assert fused.tiles() == {"dw_forward": {"POSITIONS=1024, W=32, C_in=256, DIL=5, PER_TILE=1024, M=1, DROPOUT=True, "
                                            "bfloat16, float32": "16x32, 8 warps"}}
