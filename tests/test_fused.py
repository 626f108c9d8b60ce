"""net/fused.py: the fused path (`Net.fused`) against the unfused model, both held to the unfused model in float64.

PyTorch's own fp32 path is up to ~6e-3 off float64 on this net's early-layer gradients (BatchNorm's backward
cancels large terms, and twelve layers amplify it), so two correct fp32 paths can differ by ~1e-2: each is
measured against float64, and the fused path's error may be at most about twice the unfused path's
(../shared/NOTES-FUSION.md). The kernels run in Triton's interpreter here (conftest.py), on tiny maps."""
import copy
import functools

import pytest
import torch
import torch.nn.functional as F

from net import build_model, kernels

pytestmark = pytest.mark.skipif(not (kernels.HAVE_TRITON and kernels.interpreting()),
                                reason="needs Triton's interpreter (conftest.py sets it without a GPU)")
if kernels.HAVE_TRITON and kernels.interpreting():
    from net import fused
    from net.fused import draw_seeds, dropout_mask, reference_layer


def fused_copy(model):
    model = copy.deepcopy(model)
    model.fused = True
    return model


def step(model, x, labels, autocast=False):
    """One forward and backward: (output, {parameter: gradient}, {buffer: value after the step})."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
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
def data(batch, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 6, 6, generator=gen).contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, 10, (batch,), generator=gen)


def test_a_training_step_matches_the_unfused_model_odd_batch():
    """Dropout 0: output, every gradient, the running statistics and batch counts after a step, at batch 3."""
    torch.manual_seed(1)
    model = build_model(dropout=0.0)
    x, labels = data(3)
    reference = step(copy.deepcopy(model).double(), x.double(), labels)
    assert_within_twice_the_unfused_error(step(fused_copy(model), x, labels), step(copy.deepcopy(model), x, labels),
                                          reference)


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


def masked_reference(model, x, seeds, p):
    """The unfused model's modules run layer by layer with the fused path's dropout masks (`dropout_mask`)."""
    y = x
    for k, layer in enumerate(layer for block in model.features for layer in block):
        shape = (x.shape[0], layer[0].out_channels, *x.shape[2:])
        y = reference_layer(y, layer[0], layer[1], p, dropout_mask(int(seeds[k]), shape, p).to(y.dtype))
    return model.head(model.pool(y).flatten(1))


def test_dropout_is_the_unfused_model_with_the_masks_of_dropout_mask_on_one_image():
    torch.manual_seed(3)
    model, p = build_model(dropout=0.2), 0.2
    x, labels = data(1)
    torch.manual_seed(4)
    seeds = draw_seeds(12, "cpu")  # what the fused forward draws first, from the same generator state

    def masked_step(m, x):
        out = masked_reference(m, x, seeds, p)
        F.cross_entropy(out, labels).backward()
        return (out.detach(), {n: q.grad.clone() for n, q in m.named_parameters()},
                {n: b.clone() for n, b in m.named_buffers()})

    reference, unfused = masked_step(copy.deepcopy(model).double(), x.double()), masked_step(copy.deepcopy(model), x)
    torch.manual_seed(4)
    got = step(fused_copy(model), x, labels)
    assert_within_twice_the_unfused_error(got, unfused, reference)
    keep = dropout_mask(int(seeds[0]), (1, 32, 6, 6), p)
    assert 0.6 < keep.float().mean() < 0.95  # about 1 - p of the elements kept


def ops_forward_and_backward(seed=11, p=0.3):
    """The fused ops (a grouped 3x3, the depthwise kernels' harder case; 1x1; pooling) on one input, with dropout:
    outputs and input gradients."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(2, 8, 4, 5, generator=gen).contiguous(memory_format=torch.channels_last).requires_grad_()
    s, t = torch.randn(8, generator=gen).requires_grad_(), torch.randn(8, generator=gen).requires_grad_()
    seeds = torch.tensor([seed])
    results = []
    for op, extra in ((fused.fused_dw_op, (torch.randn(16, 1, 3, 3, generator=gen), 2)),
                      (fused.fused_pw_op, (torch.randn(12, 8, generator=gen),)),
                      (fused.fused_pool_op, ())):
        outs = op(y, s, t, seeds, p, *(e.requires_grad_() if isinstance(e, torch.Tensor) else e for e in extra))
        outs = outs if isinstance(outs, tuple) else (outs,)
        grads = torch.autograd.grad(outs, (y, s, t), [torch.ones_like(o) for o in outs])
        results.append((*[o.detach() for o in outs], *grads))
    return results


@pytest.mark.slow  # the interpreter's cost per program: ten seconds of small tiles
def test_a_mask_is_keyed_by_the_elements_index_not_the_tiling(monkeypatch):
    """Each op with tiles of 8 positions x 8 channels (several programs each way, every partial sum over several
    rows, several backward tiles an image and splits of the 1x1 weight gradient) as with the interpreter's
    whole-map tiles: the same masks, the same numbers but for the order of the sums."""
    wide = ops_forward_and_backward()
    small = {kind: {k: 8 for k in b} for kind, b in fused.BLOCKS["interpreter"].items()}
    monkeypatch.setitem(fused.BLOCKS, "interpreter", small)
    monkeypatch.setattr(kernels, "TILE_ALIGN", 8)  # 3 backward tiles of the 20 positions
    monkeypatch.setitem(kernels.BACKWARD_PROGRAMS, "interpreter", 64)
    monkeypatch.setitem(fused.BACKWARD_PROGRAMS, "interpreter", 8)  # splits of the 1x1 conv's weight gradient
    for got, want in zip(ops_forward_and_backward(), wide):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


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


def test_the_state_dict_is_the_unfused_models_both_ways():
    model = build_model()
    fast = fused_copy(model)
    assert fast.state_dict().keys() == model.state_dict().keys()
    fresh = build_model()
    fresh.load_state_dict(fast.state_dict())  # a fused run's checkpoint loads into the unfused model
    x, _ = data(2)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), fast.eval()(x), rtol=1e-5, atol=1e-6)


def test_the_ops_pass_torch_library_opcheck():
    """Schema, autograd registration, and the fake (meta) implementation against the real one; the ops' gradients
    under AOTAutograd are the compile test's below (opcheck's own AOT comparison fails on these ops with equal
    gradients from functorch's aot_function: not yet understood)."""
    torch.manual_seed(8)
    y = torch.randn(2, 4, 5, 6).contiguous(memory_format=torch.channels_last).requires_grad_()
    s, t = torch.randn(4, requires_grad=True), torch.randn(4, requires_grad=True)
    seed, checks = torch.tensor([3]), ("test_schema", "test_autograd_registration", "test_faketensor")
    for op, args in ((fused.fused_dw_op, (y, s, t, seed, 0.25, torch.randn(8, 1, 3, 3, requires_grad=True), 2)),
                     (fused.fused_pw_op, (y, s, t, seed, 0.25, torch.randn(6, 4, requires_grad=True))),
                     (fused.fused_pool_op, (y, s, t, seed, 0.25))):
        torch.library.opcheck(op, args, test_utils=checks)


@pytest.mark.slow  # Dynamo tracing the whole model: ten seconds
def test_torch_compile_sees_the_fused_ops_and_no_graph_break():
    """Dynamo traces the fused forward whole (fullgraph: a graph break raises), the ops opaque; the compiled model
    computes what the eager one does. (Their fake implementations, which Inductor traces through, are opcheck's
    above; bench.traffic compiles the real model's step with them.)"""
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


def fused_build_reports():
    """ptxas's report on each fused kernel built for sm_90a at the model's widest shapes (bf16, 256 channels,
    32x32, batch 512, grouped 3x3 where a kernel serves both), with dropout, at its CUDA tile: {kernel: {tile: report}}.
    Run without TRITON_INTERPRET, by tests/test_kernels.py's build test."""
    from net import fused
    from tests.test_kernels import ptxas_report

    c, h, w, n = 256, 32, 32, 512
    vectors = dict(sp="*fp32", tp="*fp32", seed_ptr="*i64", dsum="*fp32", dsumsq="*fp32")
    maps = {name: "*bf16" for name in ("yp", "w", "y", "dy", "dyp", "dpooled", "pooled")}
    shapes = dict(C_out=c, C_in=c, C=c, H=h, W=w, HW=h * w, P=n * h * w, DIL=4, PER_TILE=1024, PER_SPLIT=8192,
                  p_drop="fp32")
    args = {**vectors, **maps, **shapes, "stats": "*fp32", "partials": "*fp32", "dw_partials": "*fp32"}
    reports = {}
    for kind, fn, tile_of, extra in (("dw_forward", fused._dw_forward, "dw_forward", dict(M=2)),
                                     ("dw_backward", fused._dw_backward, "dw_backward", dict(M=2)),
                                     ("pw_forward", fused._pw_forward, "pw_forward", dict(DOT_F32=False)),
                                     ("pw_dgrad", fused._pw_dgrad, "pw_dgrad", dict(DOT_F32=False)),
                                     ("pw_wgrad", fused._pw_wgrad, "pw_wgrad", dict(DOT_F32=False)),
                                     ("pool_forward", fused._pool_forward, "pool", {}),
                                     ("pool_backward", fused._pool_backward, "pool", {})):
        tile = dict(fused.BLOCKS["cuda"][tile_of])
        warps = tile.pop("num_warps")
        name = "x".join(str(v) for v in tile.values()) + f", {warps} warps"
        reports[kind] = {name: ptxas_report(fn, args, {**extra, "DROPOUT": True, **tile}, warps)}
    return reports
