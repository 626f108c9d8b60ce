"""`python -m bench.roofline`: every Triton kernel a training step launches, counted from its own machine code.

An estimate, not a timing, made without a GPU. A kernel is only as fast as the slowest of what it asks of the
GPU: instructions to issue, bytes to move, tensor-core FLOPs. Bytes alone (bench/traffic.py) cannot see a kernel
that issues too many instructions to reach memory speed; this row counts them:

- launches: the launchers of net/kernels.py and net/fused.py, called as a training step calls them (batch 512,
  bf16, channels_last, the `fast` recipe's dropout) on tensors of the meta device under `recording()`: their own
  grids, tiles and arguments, nothing computed. Unfused Triton convs at every tile autotune may pick (TUNING);
  the fused path at its tiles;
- instructions: each kernel built for sm_90a (H100, H200) by the installed Triton with its own compiler and
  ptxas, exactly as its launcher would specialise it; the SASS disassembled with the nvdisasm Triton ships; the
  instructions on the path a program takes, each loop's body times the trips its launcher gives (the kernel
  modules' LOOP_TRIPS). Every SASS instruction is issued once per warp, its predicated-off lanes included: a
  launch issues warps x (instructions per program) summed over its programs;
- bytes: every tensor a kernel is handed, read or written once (what Inductor counts for an opaque op), and the
  launchers' fp32 workspaces read once more by the torch sums after them; FLOPs: the tensor-core matmuls
  (TENSOR_FLOPS);
- times on each GPU below, per training image: issue = warp-instructions / issue rate, memory = bytes /
  bandwidth, tensor = FLOPs / tensor rate; the kernel's bound is the largest. A variant's predicted step is the
  sum of its kernels' bounds plus Inductor's kernels around them (and torch's first conv, head and loss) at
  their bytes, from the traffic row's count (bench/traffic.py, run here unless --traffic-from names a result).

What it cannot see, so a lower bound on time, to be checked on the first GPU: latency stalls (a warp waiting on
memory or on a dependent instruction issues nothing), occupancy (registers per thread), bank conflicts, cache
misses (the 3x3 taps' halo is assumed to come from cache), launch gaps, and the clock under load.

Built and read by bench/sass.py; the tables, the picture and this command's flags: bench/roofline_report.py.
"""
import math
import re

import torch

from .sass import build_all, build_request, program_path

# The ceilings, per second. H100 SXM and H200 SXM: 132 multiprocessors, each with 4 warp schedulers that issue at
# most one warp-instruction per clock (NVIDIA's Hopper architecture whitepaper), at about 1.755 GHz sustained under
# load (the boost clock is 1.98 GHz): 0.93e12 warp-instructions a second on both. Memory: 3.35 TB/s (H100 SXM,
# HBM3) and 4.8 TB/s (H200, HBM3e), by NVIDIA's datasheets; copies reach 80-90% of it, so these are optimistic.
# Dense bf16 tensor cores: 989 TFLOP/s on both (datasheets).
GPUS = {"H100": dict(issue=132 * 4 * 1.755e9, memory=3.35e12, tensor=989e12),
        "H200": dict(issue=132 * 4 * 1.755e9, memory=4.8e12, tensor=989e12)}
VARIANTS = ("triton convs", "fused")  # the step's variants with Triton kernels (bench/traffic.py's names)
BATCH, DROPOUT, SIZE = 512, 0.05, 32  # the `fast` recipe on a GPU: batch 512, dropout 0.05, 32x32 images


# --- a training step's launches -----------------------------------------------------------------------------------

def layer_names(model):
    """The name of each conv of the model, in order: "C1.conv", "C1.depthwise", "C1.pointwise", "C2.grouped", ..."""
    names = []
    for b, block in enumerate(model.features, 1):
        for k, layer in enumerate(block):
            conv = layer[0]
            kind = ("conv" if conv.groups == 1 else "grouped", "depthwise", "pointwise")[k]
            names.append(f"C{b}.{kind}")
    return names


def _meta(shape, dtype, nhwc=False):
    t = torch.empty(shape, dtype=dtype, device="meta")
    return t.contiguous(memory_format=torch.channels_last) if nhwc else t


def step_launches(variant, *, batch=BATCH, dtype=torch.bfloat16, p=DROPOUT, size=SIZE, channels_last=True):
    """[(layer, direction, Launch)]: every launch of the project's Triton kernels in one training step of `variant`
    ("triton convs": net/kernels.py's convs, in either layout; "fused": net/fused.py, channels_last always),
    recorded from the launchers themselves."""
    from net import build_model, kernels
    from net.model import depthwise_convs

    model = build_model(dropout=p)
    out = []
    with kernels.recording() as launches:
        def take(layer, direction, call):
            before = len(launches)
            call()
            out.extend((layer, direction, launch) for launch in launches[before:])

        if variant == "triton convs":
            for name, conv in depthwise_convs(model).items():
                x = _meta((batch, conv.in_channels, size, size), dtype, nhwc=channels_last)
                dy = _meta((batch, conv.out_channels, size, size), dtype, nhwc=channels_last)
                weight = _meta(conv.weight.shape, dtype)
                take(name, "forward", lambda: kernels._forward(x, weight, conv.dilation[0]))
                take(name, "backward", lambda: kernels._backward(dy, x, weight, conv.dilation[0]))
        elif variant == "fused":
            from net import fused

            layers = [layer for block in model.features for layer in block]
            seeds = fused.draw_seeds(len(layers), "meta")
            no_keep = torch.empty(0, dtype=torch.int32, device="meta")

            def keep(i, c):  # layer i's keep bits, made by their own kernel
                if p == 0:
                    return no_keep
                bits = []
                take(names[i], "forward", lambda: bits.append(fused.keep_bits(seeds, i, p, batch, c, size, size)))
                return bits[0]

            names = layer_names(model)
            for i, (conv, *_) in list(enumerate(layers))[1:]:
                y_prev = _meta((batch, conv.in_channels, size, size), dtype, nhwc=True)
                y = dy = _meta((batch, conv.out_channels, size, size), dtype, nhwc=True)
                vectors_in = [_meta((conv.in_channels,), torch.float32) for _ in range(2)]
                vectors_out = [_meta((conv.out_channels,), torch.float32) for _ in range(2)]
                bits = keep(i - 1, conv.in_channels)
                if conv.kernel_size == (1, 1):
                    w2 = _meta((conv.out_channels, conv.in_channels), dtype)
                    take(names[i], "forward", lambda: fused.pw_forward(y_prev, *vectors_in, bits, w2))
                    take(names[i], "backward", lambda: fused.pw_backward(dy, *vectors_out, y, y_prev, *vectors_in,
                                                                         bits, w2))
                else:
                    w9 = _meta((9, conv.out_channels), torch.float32)
                    dilation = conv.dilation[0]
                    take(names[i], "forward", lambda: fused.dw_forward(y_prev, *vectors_in, bits, w9, dilation))
                    take(names[i], "backward", lambda: fused.dw_backward(dy, *vectors_out, y, y_prev, *vectors_in,
                                                                         bits, w9, dilation))
            c = layers[-1][0].out_channels
            last = _meta((batch, c, size, size), dtype, nhwc=True)
            vectors = [_meta((c,), torch.float32) for _ in range(2)]
            bits = keep(len(layers) - 1, c)
            take("pool", "forward", lambda: fused.pool_forward(last, *vectors, bits))
            take("pool", "backward", lambda: fused.pool_backward(_meta((batch, c), dtype), last, *vectors, bits))
        else:
            raise ValueError(f"no Triton kernels in variant {variant!r}")
    return out


def loop_trips(launch, named, grid):
    from net import fused, kernels

    table = {**kernels.LOOP_TRIPS, **fused.LOOP_TRIPS}
    trips = table[launch.name](named, grid) if launch.name in table else []
    return [trips] if isinstance(trips, int) else list(trips)


def tensor_flops(launch, named):
    from net import fused

    return fused.TENSOR_FLOPS[launch.name](named) if launch.name in fused.TENSOR_FLOPS else 0


WORKSPACES = ("stats", "partials", "dw_partials", "dw_partial")  # fp32 partial sums, summed by torch after


# --- each launch's bounds, and a step's ---------------------------------------------------------------------------

def kernel_row(layer, direction, launch, tile, batch, b):
    """What one launch at one tile asks of a GPU, per training image, from its build `b`."""
    named = launch.named({k: v for k, v in tile.items() if k != "num_warps"})
    grid = launch.grid(tile)
    grid = tuple(grid) + (1,) * (3 - len(grid))
    programs = math.prod(grid)
    path = program_path(b.sass)
    trips = loop_trips(launch, named, grid)
    if len(trips) != len(path.loops):
        raise AssertionError(f"{launch.name}: {len(path.loops)} loops in its SASS, {len(trips)} in LOOP_TRIPS")
    instructions = tile["num_warps"] * (programs * path.straight
                                        + sum(body * (t - programs) for body, t in zip(path.loops, trips)))
    tensors = [v for v in named.values() if isinstance(v, torch.Tensor)]
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    workspace = sum(named[n].numel() * 4 for n in WORKSPACES if isinstance(named.get(n), torch.Tensor))
    flops = tensor_flops(launch, named)
    uses_tensor_cores = any(kind == "op" and re.search(r"\b(HGMMA|HMMA)", text) for kind, text in b.sass)
    if uses_tensor_cores != (flops > 0):
        raise AssertionError(f"{launch.name}: tensor-core instructions {uses_tensor_cores}, TENSOR_FLOPS {flops}")
    row = {"layer": layer, "direction": direction, "kernel": launch.name.strip("_"), "tile": tile_name(tile),
           "registers": b.registers, "stack": b.stack, "spills": b.spills, "instructions_per_program": path.straight,
           "loop_bodies": path.loops, "programs": programs, "warp_instructions": instructions / batch,
           "bytes": nbytes / batch, "workspace_bytes": workspace / batch, "tensor_flops": flops / batch}
    row["times"] = times(row)
    return row


def tile_name(tile):
    blocks = "x".join(str(v) for k, v in tile.items() if k.startswith("BLOCK"))
    return f"{blocks}, {tile['num_warps']} warps"


def times(row):
    """{gpu: {issue, memory, tensor: seconds per image; bound: the largest's name}}."""
    out = {}
    for gpu, rate in GPUS.items():
        t = {"issue": row["warp_instructions"] / rate["issue"], "memory": row["bytes"] / rate["memory"],
             "tensor": row["tensor_flops"] / rate["tensor"]}
        out[gpu] = {**t, "bound": max(t, key=t.get)}
    return out


def seconds(row, gpu):
    t = row["times"][gpu]
    return t[t["bound"]]


def count_variant(variant, *, batch=BATCH, p=DROPOUT, dtype=torch.bfloat16, tiles_of=None, workers=None):
    """[kernel rows]: every launch of a training step of `variant` at every tile it may run with (`tiles_of`: only
    the tile of each launch that these rows ran, by layer, direction and kernel)."""
    runs = []
    for layer, direction, launch in step_launches(variant, batch=batch, dtype=dtype, p=p):
        for tile in launch.tiles:
            key = (layer, direction, launch.name.strip("_"))
            if tiles_of is None or any((r["layer"], r["direction"], r["kernel"]) == key and r["tile"] == tile_name(tile)
                                       for r in tiles_of):
                runs.append((layer, direction, launch, tile))
    builds = build_all([build_request(launch, tile) for _, _, launch, tile in runs], workers)
    return [kernel_row(layer, direction, launch, tile, batch, builds[build_request(launch, tile)])
            for layer, direction, launch, tile in runs]


# Every variant of a step that launches Triton kernels: (variant, dtype, dropout, channels_last). The training run's
# first (bf16, the recipe's dropout); fp32 is what the fused path's start-up check and gpu-check run.
STEP_VARIANTS = ([("fused", dtype, p, True) for dtype in (torch.bfloat16, torch.float32) for p in (DROPOUT, 0.0)]
                 + [("triton convs", dtype, 0.0, layout) for dtype in (torch.bfloat16, torch.float32)
                    for layout in (True, False)])


def build_report(scope="all", workers=None):
    """[{kernel, variant, tile, registers, stack, spills}]: every kernel of every STEP_VARIANTS at every TUNING tile
    ("all"), or the training variants' kernels at their first tile ("training": bf16, the recipe's dropout,
    channels_last), built for sm_90a (for the build test, under each Triton: tests/test_kernels.py)."""
    variants = STEP_VARIANTS if scope == "all" else [v for v in STEP_VARIANTS if v[1] == torch.bfloat16 and v[3]
                                                       and (v[0] != "fused" or v[2] > 0)]
    runs = []
    for variant, dtype, p, layout in variants:
        label = f"{variant}, {str(dtype).removeprefix('torch.')}, dropout {p:g}, {'NHWC' if layout else 'NCHW'}"
        for layer, direction, launch in step_launches(variant, dtype=dtype, p=p, channels_last=layout):
            for tile in launch.tiles if scope == "all" else launch.tiles[:1]:
                runs.append((label, launch, tile, build_request(launch, tile)))
    builds = build_all([r for *_, r in runs], workers, disassemble=False)
    out = {}
    for label, launch, tile, request in runs:  # one row per build and variant (layers that build alike, once)
        b = builds[request]
        m = launch.constexprs.get("M")
        out[(label, request)] = {"kernel": launch.name.strip("_") + (f", M {m}" if m else ""), "variant": label,
                                 "tile": tile_name(tile), "registers": b.registers, "stack": b.stack}
    return list(out.values())


def picked(rows, gpu="H100"):
    """The rows a step runs: of each launch's tiles, the fastest by its bound on `gpu` (autotune's pick, if the
    bound were the time)."""
    best = {}
    for row in rows:
        key = (row["layer"], row["direction"], row["kernel"])
        if key not in best or seconds(row, gpu) < seconds(best[key], gpu):
            best[key] = row
    return list(best.values())


def summary(rows, traffic_row):
    """A variant's totals per image over the kernels it runs, and its predicted step rate on each GPU: its
    kernels' bounds, the workspaces' sums and the rest of the step (traffic's bytes less the project's ops) at
    memory speed."""
    run = picked(rows)
    rest = None
    if traffic_row is not None:
        rest = traffic_row["bytes_per_image"] - traffic_row.get("project_ops", {}).get("bytes_per_image", 0)
    out = {"kernels": len(run), "warp_instructions": sum(r["warp_instructions"] for r in run),
           "bytes": sum(r["bytes"] for r in run), "workspace_bytes": sum(r["workspace_bytes"] for r in run),
           "tensor_flops": sum(r["tensor_flops"] for r in run), "rest_bytes": rest, "predicted": {}}
    for gpu, rate in GPUS.items():
        kernels_s = sum(seconds(r, gpu) for r in picked(rows, gpu))
        other_s = (out["workspace_bytes"] + (rest or 0)) / rate["memory"]
        out["predicted"][gpu] = {"kernels_s": kernels_s, "other_s": other_s,
                                 "img_per_s": 1 / (kernels_s + other_s) if rest is not None else None,
                                 "issue_bound_img_per_s": rate["issue"] / out["warp_instructions"],
                                 "kernels_img_per_s": 1 / kernels_s}
    return out


def per_layer(rows):
    """{layer: {direction: warp-instructions per image}} of the kernels a step runs (picked tiles)."""
    layers = {}
    for r in picked(rows):
        d = layers.setdefault(r["layer"], {"forward": 0.0, "backward": 0.0})
        d[r["direction"]] += r["warp_instructions"]
    return layers


if __name__ == "__main__":  # the command itself (its flags, run and files) is the report's: bench/roofline_report.py
    from bench.roofline_report import main

    raise SystemExit(main())
