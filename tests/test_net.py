import copy
import json
import subprocess
import sys

import torch
from torch import nn

from net import build_model, count_macs, count_params, receptive_field
from net.__main__ import main as net_cli
from net.model import DepthwiseConv2d, activation_elements, block_table, depthwise_convs, train_memory_bytes


def test_parameters_under_budget():
    model = build_model()
    assert count_params(model) < 200_000
    assert count_params(model) == 133_322  # the block structure of the original design, exactly


def empirical_receptive_field(model, size=96):
    """Width of the input region that moves one centre output of the last conv map.

    Positive weights and a positive input keep every ReLU open, so the gradient is non-zero
    exactly on the receptive field.
    """
    model = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.fill_(1.0 / m.weight[0].numel())
    x = (torch.rand(1, 3, size, size, dtype=torch.float64) + 0.1).requires_grad_()
    feats = model.features(x)
    feats[0, :, size // 2, size // 2].sum().backward()
    cols = (x.grad.abs().sum(dim=(0, 1, 2)) > 0).nonzero()
    return int(cols.max() - cols.min() + 1)


def test_receptive_field_measured_equals_analytic():
    model = build_model()
    assert receptive_field(model) == 49
    assert empirical_receptive_field(model) == receptive_field(model) > 44


def test_depthwise_dilated_and_global_pooling_present():
    model = build_model()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert any(c.groups == c.in_channels == c.out_channels and c.groups > 1 for c in convs)  # depthwise
    assert any(c.dilation[0] > 1 for c in convs)
    assert sorted({c.dilation[0] for c in convs if c.kernel_size == (3, 3)}) == [1, 2, 3, 4, 5]
    assert any(isinstance(m, nn.AdaptiveAvgPool2d) for m in model.modules())


def test_maps_stay_32x32_and_output_is_logits():
    model = build_model().eval()
    x = torch.randn(2, 3, 32, 32)
    assert model.features(x).shape == (2, 256, 32, 32)
    assert model(x).shape == (2, 10)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)  # GAP: any input size


def test_channels_last_matches_nchw():
    model = build_model().eval()
    x = torch.randn(4, 3, 32, 32)
    ref = model(x)
    model_cl = model.to(memory_format=torch.channels_last)
    out = model_cl(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_dropout_is_configurable():
    drops = {m.p for m in build_model(dropout=0.25).modules() if isinstance(m, nn.Dropout)}
    assert drops == {0.25}


def test_macs_count_every_conv_and_linear():
    macs = count_macs(build_model())
    # first conv alone: 32*32 positions x 32 outputs x 27 inputs; the whole net is a few times 1e7
    assert macs > 32 * 32 * 32 * 27
    assert 10_000_000 < macs < 200_000_000


def test_cli_json():
    out = subprocess.run([sys.executable, "-m", "net", "--json"], capture_output=True, text=True, check=True).stdout
    facts = json.loads(out)
    assert facts["params"] < 200_000 and facts["receptive_field"] > 44 and facts["macs"] > 0


def test_cli_prints_the_block_table_then_torchsummary(capsys):
    net_cli([])  # in-process: the command line itself is run above
    out = capsys.readouterr().out
    assert "Total params: 133,322" in out and "receptive field  49" in out
    assert out.index("C1") < out.index("C4") < out.index("Layer (type)")  # blocks first, then the layer table


def test_block_table_adds_up_to_the_model():
    model = build_model()
    rows = block_table(model)
    assert [r[0] for r in rows] == ["C1", "C2", "C3", "C4", "head"]
    assert sum(r[4] for r in rows) == count_params(model)
    assert "plain" in rows[0][1] and "groups" in rows[1][1]  # only C1's first conv is a full conv


def test_training_memory_estimate_scales_with_the_batch():
    model = build_model()
    # three convs a block, every map 32x32 and as wide as its block
    assert activation_elements(model) == 32 * 32 * 3 * (32 + 64 + 128 + 256)
    assert train_memory_bytes(model, 512) == 4 * train_memory_bytes(model, 128)
    assert 20e6 < train_memory_bytes(model, 1) < 30e6  # calibrated on CPU fp32: about 23 MB an image


def test_the_depthwise_and_grouped_convs_are_conv2ds_run_by_torch_unless_told():
    model = build_model()
    convs = depthwise_convs(model)
    assert list(convs) == ["C1.depthwise", "C2.grouped", "C2.depthwise", "C3.grouped", "C3.depthwise", "C4.grouped",
                           "C4.depthwise"]
    assert [m for m in model.modules() if isinstance(m, DepthwiseConv2d)] == list(convs.values())
    assert all(isinstance(m, nn.Conv2d) and m.impl == "torch" and m.groups == m.in_channels for m in convs.values())
    assert [m.out_channels // m.in_channels for m in convs.values()] == [1, 2, 1, 2, 1, 2, 1]
