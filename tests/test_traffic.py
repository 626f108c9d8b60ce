"""bench/traffic.py: Inductor's count of the bytes a compiled training step moves, on a model small enough to
compile in seconds (the real one takes half a minute: `python -m bench.traffic`, and the bench's traffic row)."""
import pytest
import torch
from torch import nn

from bench import traffic


def tiny_model():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10)).to(memory_format=torch.channels_last)


def count(batch):
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 8, 8).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    return traffic.count_step(tiny_model(), x, torch.randint(0, 10, (batch,)),
                              autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))


@pytest.mark.long  # two Inductor compiles of a small model: started first, so the suite does not end on it
def test_every_kernel_of_forward_and_backward_is_counted_with_its_bytes_which_grow_with_the_batch():
    kernels = count(2)
    names = [name for name, _ in kernels]
    # the conv is opaque to Inductor: one kernel each way, with exactly its own inputs and outputs (bf16 under
    # autocast): forward reads x (2x3x8x8) and the weight (4x3x3x3) and writes y (2x4x8x8); backward reads dy, x and
    # the weight and writes the weight's gradient (the image needs none)
    assert names.count("extern extern_kernels.convolution") == 1
    assert names.count("extern torch.ops.aten.convolution_backward.default") == 1
    by_name = dict(kernels)
    assert by_name["extern extern_kernels.convolution"] == 2 * (2 * 3 * 8 * 8 + 4 * 3 * 3 * 3 + 2 * 4 * 8 * 8)
    assert by_name["extern torch.ops.aten.convolution_backward.default"] == 2 * (2 * 4 * 8 * 8 + 2 * 3 * 8 * 8
                                                                                 + 2 * 4 * 3 * 3 * 3)
    assert not any("MultiOutput" in name for name in names)  # an op's tuple elements are no kernels
    assert any("native_batch_norm_backward" in name for name in names)  # the backward graph is counted too
    assert all(b > 0 for _, b in kernels)
    larger = count(4)
    assert len(larger) == len(kernels)  # the same kernels
    assert 1.5 < sum(b for _, b in larger) / sum(b for _, b in kernels) < 2  # activations scale, weights do not


def test_bad_flags_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        traffic.main(["--batch-size", "0", "--device", "cpu"])
    assert e.value.code == 2 and "--batch-size must be at least 1" in capsys.readouterr().err
