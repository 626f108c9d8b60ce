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
"""
import argparse
import datetime
import inspect
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.checkpoint import write_atomic, write_json
from engine.cli import run_main
from engine.config import UserError
from engine.run import ROOT

# The ceilings, per second. H100 SXM and H200 SXM: 132 multiprocessors, each with 4 warp schedulers that issue at
# most one warp-instruction per clock (NVIDIA's Hopper architecture whitepaper), at about 1.755 GHz sustained under
# load (the boost clock is 1.98 GHz): 0.93e12 warp-instructions a second on both. Memory: 3.35 TB/s (H100 SXM,
# HBM3) and 4.8 TB/s (H200, HBM3e), by NVIDIA's datasheets; copies reach 80-90% of it, so these are optimistic.
# Dense bf16 tensor cores: 989 TFLOP/s on both (datasheets).
GPUS = {"H100": dict(issue=132 * 4 * 1.755e9, memory=3.35e12, tensor=989e12),
        "H200": dict(issue=132 * 4 * 1.755e9, memory=4.8e12, tensor=989e12)}
TARGET = 90  # sm_90a, both GPUs
VARIANTS = ("triton convs", "fused")  # the step's variants with Triton kernels (bench/traffic.py's names)
BATCH, DROPOUT, SIZE = 512, 0.05, 32  # the `fast` recipe on a GPU: batch 512, dropout 0.05, 32x32 images

# --- building a kernel for sm_90a, and reading its machine code ----------------------------------------------

POINTER = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int64: "*i64",
           torch.int32: "*i32", torch.int8: "*i8", torch.uint8: "*u8"}


def specialise(fn, named, plain=()):
    """(signature, constants, attrs) for triton.compile, as a launch with these arguments ({parameter: value}, a
    value may be a tensor, an int, a float, or a string naming a type: "*bf16", "fp32") would specialise `fn`:
    constexprs as given; an int 1 a constant; an int that is a multiple of 16, and every pointer (torch's
    allocations are 16-byte aligned), known divisible by 16; the parameters named in `plain` (the kernel's
    do_not_specialize) neither."""
    signature, constants, attrs = {}, {}, {}
    params = inspect.signature(fn).parameters
    for i, (name, param) in enumerate(params.items()):
        value = named[name]
        if name in plain:
            signature[name] = "i32"
            continue
        if "constexpr" in str(param.annotation) or (type(value) is int and value == 1):
            signature[name], constants[name] = "constexpr", value
            continue
        if isinstance(value, torch.Tensor):
            kind = POINTER[value.dtype]
        elif isinstance(value, bool):
            kind = "i1"
        elif isinstance(value, int):
            kind = "i32" if -2**31 <= value < 2**31 else "i64"
        elif isinstance(value, float):
            kind = "fp32"
        else:
            kind = value
        signature[name] = kind
        if kind.startswith("*") or isinstance(value, int) and not isinstance(value, bool) and value % 16 == 0:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constants, attrs


@dataclass
class Build:
    """A kernel built for sm_90a: its resources, and its SASS (instructions and labels, in order) where it was
    disassembled (nvdisasm takes half a second a kernel: the build test needs only the resources)."""
    registers: int  # per thread
    stack: int  # bytes of local memory per thread: spills, for these kernels
    sass: list = None
    spills: int = None  # local loads and stores (LDL, STL) in the SASS


def _bin(tool):
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool)


def build(fn, named, num_warps, disassemble=True):
    """`fn` (a Triton function) built for sm_90a as `named` specialises it, with `num_warps`: registers and stack
    from cuobjdump, and (`disassemble`) the SASS from nvdisasm."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    plain = [p.name for p in getattr(fn, "params", ()) if getattr(p, "do_not_specialize", False)]
    signature, constants, attrs = specialise(fn.fn, named, plain)
    compiled = triton.compile(ASTSource(fn, signature, constexprs=constants, attrs=attrs),
                              target=GPUTarget("cuda", TARGET, 32), options={"num_warps": num_warps})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([_bin("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True,
                               check=True).stdout
        b = Build(registers=int(re.search(r"REG:(\d+)", usage)[1]), stack=int(re.search(r"STACK:(\d+)", usage)[1]))
        if disassemble:
            b.sass = parse_sass(subprocess.run([_bin("nvdisasm"), "-c", str(cubin)], capture_output=True, text=True,
                                               check=True).stdout)
            b.spills = sum(1 for kind, text in b.sass if kind == "op" and re.search(r"\b(LDL|STL)\b", text))
    return b


INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(.*?)\s*;?\s*$")
LABEL = re.compile(r"^(\.L_x_\d+):")


def parse_sass(text):
    """[("label", name) | ("op", instruction)] of nvdisasm's listing, in order."""
    lines = []
    for line in text.splitlines():
        if m := LABEL.match(line):
            lines.append(("label", m[1]))
        elif m := INSTRUCTION.match(line):
            lines.append(("op", m[1]))
    return lines


@dataclass
class ProgramPath:
    """The instructions a program issues: `straight` on its way once through, and each loop's body (its
    instructions between the loop's label and its branch back, in order), which runs once more per extra trip."""
    straight: int
    loops: list = field(default_factory=list)

    def per_program(self, trips):
        """Instructions one program issues with `trips` (one per loop) trips of its loops."""
        return self.straight + sum(body * (t - 1) for body, t in zip(self.loops, trips))


def program_path(sass):
    """The path a program takes when each loop runs at least once: from the entry, every instruction in order; a
    conditional branch forward is not taken (on these kernels: the skip of a loop that runs no trip, or of a
    tail); an unconditional one is; a branch back to a label is a loop's back-edge (its body is counted once here,
    the trips by `ProgramPath.per_program`); the first unconditional EXIT ends it. Loops within loops are refused."""
    at = {name: i for i, (kind, name) in enumerate(sass) if kind == "label"}
    straight, loops, spans, i = 0, [], [], 0
    while i < len(sass):
        kind, text = sass[i]
        if kind == "label":
            i += 1
            continue
        straight += 1
        opcode = text.split()[1] if text.startswith("@") else text.split()[0]
        conditional = text.startswith("@")
        if opcode == "EXIT" and not conditional:
            return ProgramPath(straight, loops)
        if opcode.startswith("BRA"):
            target = at[re.search(r"\((\.L_x_\d+)\)", text)[1]]
            if target < i:  # a loop: its body is everything from its label to here
                if any(start <= target < end or target <= start < i for start, end in spans):
                    raise NotImplementedError("a loop within a loop: the counter knows one level")
                spans.append((target, i))
                loops.append(sum(1 for k, _ in sass[target:i + 1] if k == "op"))
            elif not conditional:
                i = target
                continue
        i += 1
    raise ValueError("no unconditional EXIT: not a kernel's listing?")


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


def _jit(kernel):
    """A launch's kernel as a Triton JITFunction (net/kernels.py's are plain functions until first run)."""
    from net import kernels

    return kernel if hasattr(kernel, "fn") else kernels._compiled(kernel, False)


def build_request(launch, tile):
    """What a launch at `tile` asks the compiler for, as plain data (for a worker process): (module, kernel name,
    its arguments by name with each tensor as its pointer type, num_warps)."""
    jit = _jit(launch.kernel)
    named = launch.named({k: v for k, v in tile.items() if k != "num_warps"})
    plain = {p.name for p in getattr(jit, "params", ()) if getattr(p, "do_not_specialize", False)}
    params = inspect.signature(jit.fn).parameters.items()
    key = tuple((name, named[name] if "constexpr" in str(p.annotation) else "i32" if name in plain
                 else _specialised(named[name])) for name, p in params)
    return jit.fn.__module__, jit.fn.__name__, key, tile["num_warps"]


def build_requested(request, disassemble=True):
    """`build` of a `build_request`, in whichever process runs it."""
    import importlib

    module, name, key, num_warps = request
    kernel = getattr(importlib.import_module(module), name)
    return build(_jit(kernel), dict(key), num_warps, disassemble)


def build_all(requests, workers=None, disassemble=True):
    """{request: Build} for every distinct request, built by `workers` processes (default: one per core): the
    compiler is single-threaded, and the builds are most of this row's time."""
    import concurrent.futures
    import multiprocessing

    todo = list(dict.fromkeys(requests))
    workers = min(workers or os.cpu_count() or 1, len(todo)) or 1
    if workers == 1:
        return {r: build_requested(r, disassemble) for r in todo}
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return dict(zip(todo, pool.map(build_requested, todo, [disassemble] * len(todo))))


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


def _specialised(value):
    """An argument as the build sees it: a tensor its pointer type (pointers taken as aligned), an int only
    whether it is 1 or a multiple of 16 (a stand-in with the same specialisation), the rest as is."""
    if isinstance(value, torch.Tensor):
        return POINTER[value.dtype]
    if type(value) is int:
        return 1 if value == 1 else 16 if value % 16 == 0 else 17
    return value


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


# --- the report ------------------------------------------------------------------------------------------------

def report(results):
    """The Markdown table: per variant its totals and predicted rates, per layer its instructions, per kernel
    its bounds."""
    lines = [f"# Roofline of the training step's Triton kernels ({results['date']})", "",
             f"An estimate, not a timing: counted from sm_90a SASS built on {results['counted_on']} by Triton "
             f"{results['triton']} (commit {results['commit']}), batch {results['batch']}, bf16, channels_last, "
             f"dropout {results['dropout']}; the rest of the step at Inductor's bytes "
             f"({results['traffic_source']}). A lower bound on time (bench/roofline.py says what it cannot see).",
             "", "Ceilings: " + "; ".join(f"{g} {r['issue'] / 1e12:.2f}e12 warp-instructions/s, "
                                         f"{r['memory'] / 1e12:.2f} TB/s, {r['tensor'] / 1e12:.0f} TFLOP/s"
                                         for g, r in GPUS.items()), "",
             "| variant | kernels | M warp-instr / img | MB / img (kernels) | MB / img (rest) | issue bound H100 img/s "
             "| predicted H100 img/s | predicted H200 img/s |", "|---|---|---|---|---|---|---|---|"]
    for key, v in results["variants"].items():
        s = v["summary"]
        rest = f"{s['rest_bytes'] / 1e6:.1f}" if s["rest_bytes"] is not None else "-"
        pred = [f"{s['predicted'][g]['img_per_s']:,.0f}" if s["predicted"][g]["img_per_s"] else "-" for g in GPUS]
        lines.append(f"| {key} | {s['kernels']} | {s['warp_instructions'] / 1e6:.1f} | {s['bytes'] / 1e6:.1f} | "
                     f"{rest} | {s['predicted']['H100']['issue_bound_img_per_s']:,.0f} | {pred[0]} | {pred[1]} |")
    for key, v in results["variants"].items():
        lines += ["", f"## {key}: per layer, M warp-instructions per image (the tiles it runs)", "",
                  "| layer | forward | backward |", "|---|---|---|"]
        for layer, d in per_layer(v["rows"]).items():
            lines.append(f"| {layer} | {d['forward'] / 1e6:.2f} | {d['backward'] / 1e6:.2f} |")
        lines += ["", f"## {key}: every kernel and tile", "",
                  "| layer | kernel | tile | regs | spills | M warp-instr / img | MB / img | GFLOP / img | H100 bound "
                  "| H100 us / batch |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in v["rows"]:
            t = r["times"]["H100"]
            lines.append(f"| {r['layer']} | {r['kernel']} | {r['tile']} | {r['registers']} | {r['stack']} B | "
                         f"{r['warp_instructions'] / 1e6:.2f} | {r['bytes'] / 1e6:.2f} | "
                         f"{r['tensor_flops'] / 1e9:.2f} | {t['bound']} | "
                         f"{t[t['bound']] * results['batch'] * 1e6:.1f} |")
    return "\n".join(lines) + "\n"


def picture(results, path):
    """The roofline as a PNG: each kernel a point, instructions against bytes per image, with the line where
    each GPU's issue time equals its memory time (above it a kernel is bound by instructions)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 6), dpi=110)
    markers = {"forward": "o", "backward": "s"}
    colours = {"triton convs": "tab:blue", "fused": "tab:red"}
    every = [r["bytes"] for v in results["variants"].values() for r in picked(v["rows"])]
    lo, hi = min(every), max(every)
    for key, v in results["variants"].items():
        for direction in markers:
            rows = [r for r in picked(v["rows"]) if r["direction"] == direction]
            ax.scatter([r["bytes"] for r in rows], [r["warp_instructions"] for r in rows], marker=markers[direction],
                       color=colours.get(key, "tab:gray"), alpha=0.75, label=f"{key}, {direction}")
    xs = [lo / 2, hi * 2]
    for (gpu, rate), style in zip(GPUS.items(), ("--", ":")):
        ax.plot(xs, [x * rate["issue"] / rate["memory"] for x in xs], "k" + style,
                label=f"{gpu}: issue time = memory time ({rate['issue'] / 1e12:.2f}e12 instr/s, "
                      f"{rate['memory'] / 1e12:.2f} TB/s)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("bytes per training image")
    ax.set_ylabel("warp-instructions per training image")
    ax.set_title(f"Triton kernels of a training step, sm_90a SASS, Triton {results['triton']}\n"
                 f"batch {results['batch']}, bf16, dropout {results['dropout']} ({results['date']}): an estimate")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def roofline_line(key, summary):
    """One line per variant, for the bench's table."""
    pred = summary["predicted"]
    rates = ", ".join(f"{g} {pred[g]['img_per_s']:,.0f}" for g in GPUS) if pred["H100"]["img_per_s"] else "no rate"
    return (f"{key}: {summary['warp_instructions'] / 1e6:.1f}M warp-instructions per training image in "
            f"{summary['kernels']} Triton kernels (issue bound {pred['H100']['issue_bound_img_per_s']:,.0f} img/s on "
            f"an H100); predicted step {rates} img/s (an estimate from sm_90a SASS, not a timing)")


def roofline_rows(traffic, batch=BATCH, dropout=DROPOUT):
    """{variant: summary} of `python -m bench.roofline` run in its own process (Triton builds nothing where
    TRITON_INTERPRET is set), on the bench's own traffic rows, as the bench records them."""
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "traffic.json"
        source.write_text(json.dumps({"traffic": traffic}))
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        r = subprocess.run([sys.executable, "-m", "bench.roofline", "--traffic-from", str(source), "--out", tmp,
                            "--name", "roofline", "--png", "", "--batch-size", str(batch), "--dropout", str(dropout)],
                           capture_output=True, text=True, env=env, cwd=ROOT)
        if r.returncode != 0:
            raise RuntimeError(f"the roofline failed: {r.stderr.strip()[-2000:]}")
        data = json.loads((Path(tmp) / "roofline.json").read_text())
    return {key: {**v["summary"], "triton": data["triton"]} for key, v in data["variants"].items()}


def git_commit():
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    return (r.stdout.strip() + ("+changes" if dirty else "")) if r.returncode == 0 else "unknown"


def load_traffic(path):
    """{variant: traffic row} from a bench or roofline result (JSON)."""
    data = json.loads(Path(path).read_text())
    traffic = data.get("traffic") or {}
    if not traffic:
        raise UserError(f"{path}: no traffic rows in it; name a bench or roofline result with them, or leave "
                        f"--traffic-from out to count them here")
    return traffic


def run(args):
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise UserError("TRITON_INTERPRET=1 is set: Triton then builds nothing; unset it to count the kernels")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, and 3.6's (3.10 changes it)
    import triton

    traffic, source = {}, ""
    counting = None
    if args.traffic_from:
        traffic, source = load_traffic(args.traffic_from), f"from {args.traffic_from}"
    else:  # counted alongside, in its own processes (a minute or two on a CPU), while this one builds
        from .traffic import BATCH as TRAFFIC_BATCH
        from .traffic import traffic_rows

        device = "cuda" if torch.cuda.is_available() else "cpu"
        source = f"counted now by Inductor for {device} at batch {TRAFFIC_BATCH}"
        failure = []

        def count():
            try:
                traffic.update(traffic_rows(device, TRAFFIC_BATCH, ("torch convs",) + VARIANTS))
            except RuntimeError as e:
                failure.append(str(e))

        counting = threading.Thread(target=count)
        counting.start()
    results = {"date": datetime.date.today().isoformat(), "commit": git_commit(), "triton": triton.__version__,
               "torch": torch.__version__, "counted_on": f"a {'CUDA' if torch.cuda.is_available() else 'CPU'} "
                                                         f"machine ({os.cpu_count()} cores)",
               "batch": args.batch_size, "dropout": args.dropout, "gpus": GPUS, "variants": {}}
    print(f"building every Triton kernel of a training step for sm_90a (Triton {triton.__version__}), batch "
          f"{args.batch_size}, dropout {args.dropout} ...", flush=True)
    for variant in args.variant or VARIANTS:
        rows = count_variant(variant, batch=args.batch_size, p=args.dropout)
        results["variants"][variant] = {"rows": rows}
        print(f"  {variant}: {len(rows)} kernel launches and tiles counted", flush=True)
        if variant == "fused" and args.dropout > 0:  # what dropout costs: the same step, the same tiles, without it
            plain = count_variant(variant, batch=args.batch_size, p=0.0, tiles_of=picked(rows))
            results["variants"]["fused, dropout 0"] = {"rows": plain}
    if counting is not None:
        counting.join()
        if failure:
            print(f"note: the traffic count failed, so no predicted step rate: {failure[0][-500:]}", flush=True)
    results["traffic"], results["traffic_source"] = traffic, source
    for key, v in results["variants"].items():
        v["summary"] = summary(v["rows"], traffic.get(key.split(",")[0]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / args.name
    write_json(results, stem.with_suffix(".json"))
    text = report(results)
    write_atomic(stem.with_suffix(".md"), lambda tmp: Path(tmp).write_text(text))
    png = ""
    if args.png:
        try:
            picture(results, Path(args.png))
            png = f", {args.png}"
        except ImportError:
            print("note: no picture: matplotlib is not installed (pip install matplotlib)", flush=True)
    print("\n" + text.split("\n## ")[0])
    print(f"wrote {stem}.json, {stem}.md{png}")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.roofline", description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=BATCH, help=f"images per step (default {BATCH})")
    parser.add_argument("--dropout", type=float, default=DROPOUT, help=f"after every conv (default {DROPOUT}, the "
                        "`fast` recipe); the fused step is also counted without it")
    parser.add_argument("--variant", choices=VARIANTS, action="append", help="count only this variant (again for "
                        "more; default: both)")
    parser.add_argument("--traffic-from", default=None, help="take the traffic rows from this bench or roofline "
                        "result (JSON) instead of counting them now")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for the .json and .md")
    parser.add_argument("--name", default=f"{datetime.date.today().isoformat()}-roofline",
                        help="file name of the results, without suffix (default: <date>-roofline)")
    parser.add_argument("--png", default=str(ROOT / "docs" / "roofline.png"),
                        help="the picture (default docs/roofline.png; '' for none)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if not 0 <= args.dropout < 1:
        parser.error("--dropout must be in [0, 1)")
    return run_main(lambda _: run(args))


if __name__ == "__main__":
    raise SystemExit(main())
