"""The seed CNN: four dilated depthwise-separable blocks, global average pooling, a 2-layer head.

Every map stays 32x32 (stride 1 everywhere, padding = dilation): the receptive field grows
through dilation alone, 1 + 2 * (1+2+2+3+3+4+4+5) = 49 pixels, wider than the 32-pixel image.
Depthwise and grouped 3x3 convs keep the parameter count near 133k; the 1x1 pointwise convs
mix channels. Those seven depthwise and grouped convs can run on the project's own Triton
kernels (`DepthwiseConv2d.impl`, set by the trainer: net/kernels.py says why).
"""
import torch
from torch import nn

from .kernels import dwconv, runs_kernels


class DepthwiseConv2d(nn.Conv2d):
    """A 3x3 conv with one input channel per group (depthwise, or grouped C -> 2C), padding = dilation.

    nn.Conv2d's parameters and state_dict, unchanged; `impl` says what runs it: "torch" (F.conv2d:
    cuDNN or PyTorch's own kernel; the default, and what export and the CPU use) or "triton"
    (`net.kernels.dwconv`, which itself falls back to F.conv2d where Triton cannot run)."""

    impl = "torch"

    def forward(self, x):
        if self.impl == "triton":
            return dwconv(x, self.weight, self.dilation[0])
        return super().forward(x)


def conv_bn_relu(c_in, c_out, *, kernel=3, dilation=1, groups=1, dropout=0.1):
    """Conv (no bias: BatchNorm has one) -> BN -> ReLU -> Dropout, same spatial size out."""
    padding = dilation * (kernel - 1) // 2
    conv = DepthwiseConv2d if groups == c_in > 1 and kernel == 3 else nn.Conv2d
    return nn.Sequential(
        conv(c_in, c_out, kernel, padding=padding, dilation=dilation, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
    )


def block(c_in, c_out, *, dilation, first=False, dropout=0.1):
    """3x3 conv (plain in C1, grouped elsewhere) | depthwise 3x3 | pointwise 1x1.

    The depthwise conv's dilation is one more than the first conv's (1,2 / 2,3 / 3,4 / 4,5).
    """
    groups = 1 if first else c_in  # grouped: each input channel feeds c_out / c_in outputs
    return nn.Sequential(
        conv_bn_relu(c_in, c_out, dilation=dilation, groups=groups, dropout=dropout),
        conv_bn_relu(c_out, c_out, dilation=dilation + 1, groups=c_out, dropout=dropout),
        conv_bn_relu(c_out, c_out, kernel=1, dropout=dropout),
    )


class Net(nn.Module):
    def __init__(self, widths=(32, 64, 128, 256), num_classes=10, dropout=0.1):
        super().__init__()
        c1, c2, c3, c4 = widths
        self.features = nn.Sequential(
            block(3, c1, dilation=1, first=True, dropout=dropout),  # C1
            block(c1, c2, dilation=2, dropout=dropout),  # C2
            block(c2, c3, dilation=3, dropout=dropout),  # C3
            block(c3, c4, dilation=4, dropout=dropout),  # C4
        )
        self.pool = nn.AdaptiveAvgPool2d(1)  # GAP: any input size gives one vector
        self.head = nn.Sequential(nn.Linear(c4, 128), nn.ReLU(inplace=True), nn.Linear(128, num_classes))

    # The fused path: each conv with its neighbours' BatchNorm, ReLU and dropout in the same kernels, those of
    # x's device (`fused_path`); the same parameters, buffers and function. Set by the trainer (--fuse); False:
    # these modules, as written above.
    fused = False

    def forward(self, x):
        if self.fused:
            return fused_path(x.device).forward(self, x)
        return self.head(self.pool(self.features(x)).flatten(1))


def fused_path(device):
    """The module whose `forward(model, x)` runs the fused path on `device`'s tensors: net/fused.py's Triton kernels
    on CUDA (and on a CPU under Triton's interpreter, for tests), net/cpu.py's C++ kernels on a CPU otherwise."""
    if runs_kernels(device):
        from . import fused  # imports Triton: only where its kernels run
        return fused
    assert device.type == "cpu", f"no fused path on {device}"
    from . import cpu
    return cpu


def build_model(*, dropout=0.1, num_classes=10, widths=(32, 64, 128, 256)):
    """The seed model, freshly initialised (PyTorch defaults)."""
    return Net(widths=widths, num_classes=num_classes, dropout=dropout)


# --- model facts, used by `python -m net`, the trainer, the tests and the bench ----------------

def count_params(model):
    return sum(p.numel() for p in model.parameters())


def receptive_field(model):
    """Analytic receptive field of the conv stack, in input pixels (rf += (k-1)*dilation*jump)."""
    rf, jump = 1, 1
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            rf += (m.kernel_size[0] - 1) * m.dilation[0] * jump
            jump *= m.stride[0]
    return rf


@torch.no_grad()
def _forward_one(model, layer_types, hook, size=32):
    """One forward pass of a 3 x size x size image in eval mode, `hook(m, out)` on each layer of
    `layer_types`; the model's mode and hooks are restored after."""
    handles = [m.register_forward_hook(lambda m, inputs, out: hook(m, out))
               for m in model.modules() if isinstance(m, layer_types)]
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(1, 3, size, size, device=next(model.parameters()).device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()


def count_macs(model, size=32):
    """Multiply-accumulates of one forward pass on a 3 x size x size image (convs and linears)."""
    macs = []

    def hook(m, out):
        if isinstance(m, nn.Conv2d):
            macs.append(out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1])
        else:
            macs.append(m.in_features * m.out_features)

    _forward_one(model, (nn.Conv2d, nn.Linear), hook, size)
    return sum(macs)


def activation_elements(model, size=32):
    """Elements of every conv output per image: the maps a training step must keep for backward."""
    sizes = []
    _forward_one(model, nn.Conv2d, lambda m, out: sizes.append(out.numel()), size)
    return sum(sizes)


def train_memory_bytes(model, batch_size, dtype_bytes=4):
    """About how much memory the activations of one training step take, in bytes.

    Four tensors the size of every conv output, at the training dtype: the conv and BatchNorm
    outputs and the Dropout output and mask that autograd keeps, and the gradients in flight.
    Calibrated on CPU in fp32: peak resident memory grew 23 MB per image from batch 64 to 256,
    and this gives 23.5 MB.
    """
    return batch_size * activation_elements(model) * 4 * dtype_bytes


def depthwise_convs(model):
    """{name: module} of the model's depthwise and grouped 3x3 convs, named by block: "C2.grouped",
    "C2.depthwise", ... (C1's first conv is a plain conv, so C1 has only its depthwise one)."""
    return {f"C{i}.{'depthwise' if m.in_channels == m.out_channels else 'grouped'}": m
            for i,
           b in enumerate(model.features, 1) for layer in b for m in layer[:1] if isinstance(m, DepthwiseConv2d)}


def block_table(model):
    """[(block, conv 3x3, depthwise 3x3, pointwise 1x1, params)]: the blocks C1..C4, then the head."""
    rows = []
    for i, b in enumerate(model.features, 1):
        conv, depthwise, pointwise = (layer[0] for layer in b)  # each layer: conv, BN, ReLU, Dropout
        rows.append((f"C{i}",
                     f"{conv.in_channels} -> {conv.out_channels}, dilation {conv.dilation[0]}, "
                     + ("plain" if conv.groups == 1 else f"groups {conv.groups}"),
                     f"{depthwise.out_channels}, dilation {depthwise.dilation[0]}",
                     f"{pointwise.in_channels} -> {pointwise.out_channels}",
                     count_params(b)))
    first, last = model.head[0], model.head[-1]
    rows.append(("head", f"GAP, Linear {first.in_features} -> {first.out_features}, ReLU, "
                         f"Linear {last.in_features} -> {last.out_features}", "", "", count_params(model.head)))
    return rows
