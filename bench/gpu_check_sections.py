"""The sections of `make gpu-check` (bench/gpu_check.py), each a function that runs its part on this GPU and
returns (Markdown lines, data) for the report: the versions, the CUDA tests in a pytest process, the Triton kernels
and the fused path against torch, each conv alone, the train steps, the DALI pipelines, and the whole bench.
"""
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from engine.run import ROOT


def versions():
    import nvidia.dali

    from engine.run import git_commit

    props = torch.cuda.get_device_properties(0)
    facts = {"device": torch.cuda.get_device_name(0), "memory_gib": round(props.total_memory / 2**30, 1),
             "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
             "dali": nvidia.dali.__version__, "python": platform.python_version(),
             "commit": git_commit() or "unknown (no git here: record it by hand)"}
    return [f"- {k}: {v}" for k, v in facts.items()], facts


def cuda_tests(out, data, timeout, paths=(), ignore=(), stem="cuda-tests"):
    """The CUDA tests (`pytest -m cuda`) of `paths` (default: all) but `ignore`: a verdict, with the log and JUnit XML
    under `out` named by `stem`."""
    xml = out / f"{stem}.xml"
    t0 = time.perf_counter()
    env = {**os.environ, **({"CIFAR10_JPEG": str(Path(data).resolve())} if Path(data).is_file() else {})}
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-v", "-rfEs", "-p", "no:cacheprovider",
               f"--junitxml={xml.resolve()}", *paths, *(f"--ignore={path}" for path in ignore)]
    try:  # -v: a cut-short log still names each test that finished
        r = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout)
        returncode, stdout, stderr = r.returncode, r.stdout, r.stderr
    except subprocess.TimeoutExpired as e:  # a hung test must not take the rest of the check with it
        returncode, stdout, stderr = None, text_of(e.stdout), text_of(e.stderr)
    (out / f"{stem}.log").write_text(stdout + stderr)
    suite = ET.parse(xml).getroot().find("testsuite") if xml.exists() else None
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")} if suite is not None else {}
    ok = returncode == 0 and counts.get("tests", 0) > 0 and counts.get("skipped", 1) == 0
    verdict = "PASS" if ok else "FAIL" if returncode is not None else f"TIMEOUT after {timeout} s"
    lines = [f"- {verdict}: {counts} in {time.perf_counter() - t0:.0f} s (every CUDA test must run: "
             f"a skip counts as a failure here); log: {stem}.log"]
    lines += [f"  - {line}" for line in stdout.splitlines() if line.startswith(("FAILED", "ERROR", "SKIPPED"))][:30]
    if returncode is None:
        lines += [f"  - finished before the cut: {line}" for line in stdout.splitlines() if line.endswith("]")
                  and ("PASSED" in line or "FAILED" in line)][:30]
    return lines, {"ok": ok, "timed_out": returncode is None, **counts}


def text_of(output):
    """TimeoutExpired's captured output: bytes even under text=True on some Pythons, or None."""
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def pipelines(data):
    from bench.pipelines import bench_dali, bench_data, bench_draws, bench_host_cost
    from pipelines import Augment

    images, labels, blobs, what = bench_data(data, n_encoded=20_000, n_synthetic=50_000)
    timing = dict(repeats=5, warmup=4, steps=20, sync=torch.cuda.synchronize)
    rows = {"augment draws (ms per 512)": bench_draws()["ms"]}
    off = dict(flip_p=0, ssr_p=0, cutout_p=0)
    # Each augmentation alone too: on an H100 (2026-11-26) the augmented raw graph ran at 89k img/s
    # against 631k without augmentation, and which operator takes the 10 ms per batch is the question.
    for name, (x, y, aug) in {"raw, augmented": (images, labels, Augment()),
                              "raw, no augmentation": (images, labels, None),
                              "raw, flip only": (images, labels, Augment(**{**off, "flip_p": 0.5})),
                              "raw, shift-scale-rotate only": (images, labels, Augment(**{**off, "ssr_p": 0.5})),
                              "raw, cutout only": (images, labels, Augment(**{**off, "cutout_p": 0.5})),
                              "encoded (nvJPEG), augmented": (blobs, labels[:len(blobs)], Augment()),
                              "encoded (nvJPEG), no augmentation": (blobs, labels[:len(blobs)], None)}.items():
        rows[f"DALI {name}, img/s"] = bench_dali(x, y, "cuda", 1024, timing, augment=aug)["img_per_s"]
    lines = [f"- data: {what}"] + [f"- {k}: {v:,.3f}" if v < 100 else f"- {k}: {v:,.0f}" for k, v in rows.items()]
    # The same batch sweep as the CPU bench's row, on the GPU graph: a difference of small times, so more batches.
    host = bench_host_cost("cuda", {**timing, "steps": 60, "repeats": 7})
    lines += ["", "Host cost of augmentation per batch (the GPU graph on 1x1 images, augmented minus plain):", "",
              "| batch | augmented ms | plain ms | augmentation ms |", "|---|---|---|---|"]
    lines += [f"| {int(b):,} | {r['augmented_ms']:.2f} | {r['plain_ms']:.2f} | {r['cost_ms']:.2f} |"
              for b, r in host["batches"].items()]
    lines.append("- growth per doubling of the batch: "
                 f"{', '.join(f'x{g:.1f}' for g in host['growth_per_doubling'] if g)}"
                 f" (x2: linear; x4: a per-image argument)")
    return lines, {**rows, "host_cost": host}


def trainer_setup():
    """The default recipe's Config and Env on this GPU, as train.py resolves and sets them up."""
    from engine.config import Config, resolve
    from engine.device import setup_env

    cfg = resolve(Config(device="cuda"))
    return cfg, setup_env(cfg)


def kernels(batch=512):
    """Every depthwise and grouped conv of the model, in the kernels and in F.conv2d, against fp32 F.conv2d:
    the worst relative error over the output and both gradients, and the trainer's verdict on it."""
    from engine.convs import check_layer
    from net import build_model
    from net.kernels import runs_kernels
    from net.model import depthwise_convs

    device = torch.device("cuda")
    if not runs_kernels(device):
        return ["- FAIL: Triton is not installed here, so the kernels cannot run"], {"ok": False}
    rows, ok = {}, True
    lines = ["| conv | dtype | layout | kernels' error | F.conv2d's error | verdict |", "|---|---|---|---|---|---|"]
    for name, conv in depthwise_convs(build_model().to(device)).items():
        for dtype in (torch.bfloat16, torch.float32):
            for layout, fmt in (("channels_last", torch.channels_last), ("NCHW", torch.contiguous_format)):
                error, torch_error = check_layer(conv, batch=batch, size=32, dtype=dtype, memory_format=fmt,
                                                 device=device)
                good = error <= 2 * torch_error + 1e-4  # the rule train.py applies before using a kernel
                ok &= good
                rows[f"{name}, {dtype}, {layout}"] = {"error": error, "torch_error": torch_error, "ok": good}
                lines.append(f"| {name} | {str(dtype).removeprefix('torch.')} | {layout} | {error:.2e} | "
                             f"{torch_error:.2e} | {'ok' if good else 'FAIL'} |")
    from bench.convs import tiles_table
    from net.kernels import tiles

    lines += ["", "Tiles autotune picked (net/kernels.py's TUNING), per kernel and shape:", "", tiles_table()]
    return [f"- {'PASS' if ok else 'FAIL'}: batch {batch}, 32x32; each error the worst of output, input gradient and "
            f"weight gradient, relative to the largest fp32 value", ""] + lines, {"ok": ok, "rows": rows,
                                                                                  "tiles": tiles()}


def fused(batch=512):
    """The fused path (net/fused.py) on the GPU: its start-up check (one training step each way, dropout 0 and the
    recipe's, every tensor against the unfused model in float64) in fp32 as the trainer runs it (autocast and TF32
    off: the verdict) and at the run's bf16 (for the record), at batch 64 on 32x32; then whole training steps fused
    against unfused, compiled bf16 channels_last as the trainer runs them, at the trainer's batch."""
    import net.fused  # noqa: F401  (the fused ops, before anything compiles)
    from engine.convs import TOLERANCE, check_fused, time_steps

    cfg, env = trainer_setup()
    from net import build_model

    model = build_model(dropout=cfg.dropout).to(env.device, memory_format=env.memory_format)
    lines, data = ["| precision | tensors | worst tensor | fused error | unfused error | verdict |",
                   "|---|---|---|---|---|---|"], {}
    for precision in ("fp32", "run"):
        check = check_fused(model, env, batch=64, precision=precision)
        name, error, unfused = check.worst
        data[precision] = {"errors": check.errors, "failed": check.failed, "seconds": check.seconds}
        verdict = ("ok" if not check.failed else f"FAIL: {', '.join(check.failed[:5])}") if precision == "fp32" else \
            f"{len(check.failed)} over the rule (bf16: for the record)"
        label = "fp32 (autocast, TF32 off)" if precision == "fp32" else env.precision_and_layout + " (autocast)"
        lines.append(f"| {label} | {len(check.errors)} | {name} | {error:.2e} | {unfused:.2e} | {verdict} |")
    ok = not data["fp32"]["failed"]
    ms = time_steps(model, env, batch=batch, compiled=True, mode=cfg.compile_mode)
    data["ms"], data["tiles"] = ms, net.fused.tiles()
    lines += ["", f"- a training step (forward + backward), compiled bf16 channels_last, batch {batch}: fused "
                  f"{ms['fused']:.2f} ms ({batch / ms['fused'] * 1e3:,.0f} img/s), unfused {ms['unfused']:.2f} ms "
                  f"({batch / ms['unfused'] * 1e3:,.0f} img/s): {ms['unfused'] / ms['fused']:.2f}x", "",
              "Tiles autotune picked for the fused kernels (net/fused.py's TUNING), per kernel and shape:", ""]
    lines += [f"- {kind}: {shape} -> {tile}" for kind, picks in data["tiles"].items() for shape, tile in picks.items()]
    return [f"- {'PASS' if ok else 'FAIL'}: each tensor's error against float64 within twice the unfused path's "
            f"(+{TOLERANCE:g}: ReLU flips), in fp32", ""] + lines, {"ok": ok, **data}


def conv_breakdown():
    """`python -m bench.convs` on this GPU: each conv in each implementation, then the trainer's top kernels."""
    from bench.convs import conv_rows, conv_table, copy_bandwidth, tiles_table, top_kernels

    cfg, env = trainer_setup()
    timing = dict(steps=10, repeats=5, warmup=3, sync=torch.cuda.synchronize)
    bandwidth = copy_bandwidth(env.device, timing)
    rows = conv_rows(env.device, env.dtype, cfg.batch_size, timing, bandwidth)
    lines = [f"batch {cfg.batch_size}, {env.dtype}; ms (median of 5), in brackets the share the conv's memory traffic "
             f"needs at {bandwidth / 1e9:,.0f} GB/s", "", "Forward + backward:", "", conv_table(rows, 1), "",
             "Forward:", "", conv_table(rows, 0), "", "Tiles autotune picked:", "", tiles_table(), "",
             f"Top kernels, 5 eager train steps ({env.precision_and_layout}, "
             f"--conv-impl {cfg.conv_impl}):", "", "```", top_kernels(cfg, env), "```"]
    return lines, {"bandwidth": bandwidth, "rows": rows}


def steps():
    """The train step alone in every bench variant, each through the trainer's conv choice and compile check."""
    from bench.model import bench_model, model_variants, prepare_model
    from bench.report import figure

    cfg, env = trainer_setup()
    results = {"convs": {}, "compile": {}, "model": {}}
    t0 = time.perf_counter()
    models = {key: prepare_model(cfg, env, key, results) for key in model_variants("cuda")}
    timing = dict(steps=50, repeats=5, warmup=10, sync=torch.cuda.synchronize)
    bench_model(cfg, env, models, timing, lambda key, row: results["model"].__setitem__(key, row))
    lines = ["| variant | img/s (median) | min - max |", "|---|---|---|"]
    lines += [f"| {key} | {figure(r['img_per_s'])} | {figure(r['min'])} - {figure(r['max'])} |"
              for key, r in results["model"].items()]
    lines += [""] + [f"- compile ({key}): " + (f"{c['graphs']} graphs in {c['seconds']:.1f} s, error against fp32 "
                                               f"{c['error']:.2e} (eager "
                                               f"{c['eager_error']:.2e})" if c["compiled"] else c["note"])
                     for key, c in results["compile"].items()]
    lines += [f"- convs ({key}): {c['line']}" for key, c in results["convs"].items() if c["ms"] or c["notes"]]
    lines.append(f"- batch {cfg.batch_size}; {time.perf_counter() - t0:.0f} s for the section, compiles included")
    return lines, results


def bench(out, data):
    r = subprocess.run([sys.executable, "-m", "bench", "--device", "cuda", "--data", data, "--out", str(out / "bench"),
                        "--tensorboard", str(out / "bench" / "tensorboard")], cwd=ROOT, capture_output=True, text=True)
    (out / "bench.log").write_text(r.stdout + r.stderr)
    tables = sorted((out / "bench").glob("*.md"))
    lines = tables[-1].read_text().splitlines() if tables else []
    return [f"- exit {r.returncode}; log: bench.log", ""] + lines, {"exit": r.returncode}
