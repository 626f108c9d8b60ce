"""`python -m bench` (`make bench`): images/second at every stage, side by side, in one run.

1. data pipelines alone: DALI raw (with and without augmentation) and encoded, on the GPU and
   the CPU, a plain-torch augmenter doing the same three augmentations on the same device, and
   the original design's Albumentations loader; beside them what a batch costs outside the
   graph: the numpy parameter draws, and an epoch's start (pipeline build, then reset);
2. the model's train step alone on device-resident batches of the dtype and layout training
   feeds each variant (eager fp32 NCHW / channels_last, eager and compiled bf16 in NCHW and in
   channels_last, with torch's convs and with the project's Triton kernels, compiled through the
   trainer's compile check, convs chosen by the trainer's `choose_convs`) and inference;
3. end to end: `engine.loop.train_epoch`, the very loop train.py runs (recipe optimizer and
   schedule, on-device metrics, log-step syncs), over the DALI loader, and its ratio to (2);
4. the limit: FLOPs and minimum bytes per training image against the device's measured
   matmul rate and copy bandwidth; on a CPU, the fused step a layer at a time beside each layer's floor
   (bench/layers.py); beside it, the bytes per image the compiled training step
   really moves in each conv variant, counted by Inductor after fusion (bench/traffic.py: an
   estimate, not a timing), and the instructions its Triton kernels issue, counted from their sm_90a
   machine code, with the step rate they predict on an H100 and an H200 (bench/roofline.py);
5. accuracy beside speed, from a training run's summary.json.

Device set-up is train.py's (`setup_env`: cuDNN autotune, TF32, bf16 autocast). Every figure:
warm-up first (compile, autotune, DALI start), then 5 timed repeats (3 with --quick) between synchronisations
over distinct batches; the median is reported with min and max. Each row is written to the
results files as soon as it is measured.

The rows are measured by bench/pipelines.py (1), bench/model.py (2-4) and reported by
bench/report.py (5, the table, TensorBoard); bench/timing.py takes every figure.
"""
import argparse
import datetime
import os
from pathlib import Path

import numpy as np
import torch

from engine.checkpoint import write_atomic, write_json
from engine.cli import run_main
from engine.config import Config, UserError, resolve
from engine.device import setup_env
from engine.run import ROOT, run_facts

from .layers import cpu_kernels_missing, layer_rows
from .model import bench_end_to_end, bench_limit, bench_model, model_variants, prepare_model
from .pipelines import (
    bench_albumentations,
    bench_dali,
    bench_data,
    bench_draws,
    bench_epoch_start,
    bench_host_cost,
    bench_torch_augment,
)
from .report import accuracy, figure, table, write_tensorboard
from .roofline_report import roofline_line, roofline_rows
from .traffic import BATCH, QUICK_BATCH, traffic_line, traffic_rows


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true",
                        help="fewer, smaller steps, results in bench/results/quick/ (git ignores it): "
                             "a smoke test of the bench")
    parser.add_argument("--data", default="data",
                        help="CIFAR-10 for the pipeline figures (default: data; synthetic if absent)")
    parser.add_argument("--batch-size", type=int, default=None, help="train batch (default: 512 on cuda, 32 on cpu)")
    parser.add_argument("--train", action="store_true",
                        help="run train.py (default recipe) first, for the accuracy row")
    parser.add_argument("--out", default=None, help="folder for the .json and .md results (default: bench/results, "
                        "bench/results/quick with --quick)")
    parser.add_argument("--tensorboard", default=str(ROOT / "bench" / "tensorboard"),
                        help="parent folder of the TensorBoard scalars (kept apart from training runs)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available; use --device cpu")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    args.out = args.out or str(ROOT / "bench" / "results" / ("quick" if args.quick else ""))
    return run_main(lambda _: run(args))


def run(args):
    cpu = args.device == "cpu"
    # The default recipe, as train.py resolves it on this device, at the bench's batch size, with
    # train.py's device set-up (cuDNN autotune, TF32, bf16 autocast on CUDA).
    cfg = resolve(Config(device=args.device, batch_size=args.batch_size or (32 if cpu else 512)))
    env = setup_env(cfg)  # on CPU also the thread counts: torch on the idle cores, DALI one thread
    print(f"threads: torch {env.threads}, DALI {env.dali_threads} for end to end ({env.threads_why})", flush=True)
    timing = dict(repeats=3 if args.quick else 5, warmup=(1 if args.quick else 2) if cpu else 10,
                  steps=(1 if args.quick else 3) if cpu else (10 if args.quick else 50),
                  sync=torch.cuda.synchronize if not cpu else (lambda: None))
    pipe_batch = 256 if cpu else 1024  # pipelines alone: their own good batch; DALI's fixed cost is per batch
    pipe_timing = {**timing, "steps": 4 if args.quick else 20, "warmup": 4}

    images, labels, blobs, what = bench_data(args.data, n_encoded=1024 if args.quick else 20_000,
                                             n_synthetic=2048 if args.quick else 50_000)
    need = max(pipe_batch, cfg.batch_size)
    if len(labels) < need or len(blobs) < pipe_batch:
        raise UserError(f"{args.data}: {min(len(labels), len(blobs))} train images, fewer than the {need} of one "
                        f"batch; bench a full copy of CIFAR-10 (or a missing --data path, for synthetic images)")
    # End to end on CPU: a few steps' worth of images per epoch (a whole one takes 20 minutes there).
    e2e_images = len(labels) if not cpu and not args.quick else cfg.batch_size * timing["steps"]
    print(f"bench on {args.device}: {what}", flush=True)
    facts = run_facts(env)
    if cpu:
        facts["device"] = f"cpu ({os.cpu_count()} cores)"
    facts["threads"] = {"torch": env.threads, "dali_end_to_end": env.dali_threads, "why": env.threads_why}
    results = {**facts, "date": datetime.date.today().isoformat(), "quick": args.quick, "data": what,
               "recipe": cfg.recipe, "complete": False, "pipeline": {}, "costs": {}, "model": {}, "compile": {},
               "convs": {}, "traffic": {}, "roofline": {}, "skipped": {}, "end_to_end_others": {}}
    out = Path(args.out)
    stem = out / f"{results['date']}-{args.device}{'-quick' if args.quick else ''}"

    def save():  # after every row: a bench that fails or is killed keeps what it measured
        out.mkdir(parents=True, exist_ok=True)
        write_json(results, stem.with_suffix(".json"))
        write_atomic(stem.with_suffix(".md"), lambda tmp: Path(tmp).write_text(table(results) + "\n"))

    def record(section, key, row):
        results[section][key] = row
        floats = {k: v for k, v in row.items() if isinstance(v, float)} or \
            {f"batch {b} ms": r["cost_ms"] for b, r in row.get("batches", {}).items()}  # the host-cost sweep
        print(f"  {key}: " + (f"{figure(row['img_per_s'])} img/s" if "img_per_s" in row else
                              ", ".join(f"{k} {v:.3g}" for k, v in floats.items())), flush=True)
        save()

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    record("costs", "augment draws", bench_draws())
    for dev in ["cpu"] if cpu else ["cuda", "cpu"]:
        print(f"pipelines on {dev} ...", flush=True)
        record("pipeline", f"DALI raw, {dev}", bench_dali(images, labels, dev, pipe_batch, pipe_timing))
        record("pipeline", f"DALI raw, no augmentation, {dev}",
               bench_dali(images, labels, dev, pipe_batch, pipe_timing, augment=None))
        record("pipeline", f"DALI encoded (decode), {dev}",
               bench_dali(blobs, labels[:len(blobs)], dev, pipe_batch, pipe_timing))
        record("costs", f"epoch start, DALI raw, {dev}",
               bench_epoch_start(images[:4 * pipe_batch], labels[:4 * pipe_batch],
                                                                          dev, pipe_batch))
        # A difference of two small times: more batches per figure than the other rows take (each costs milliseconds).
        host_timing = pipe_timing if args.quick else {**pipe_timing, "steps": 60, "repeats": 7}
        record("costs", f"augmentation host cost, {dev}", bench_host_cost(dev, host_timing))
        record("pipeline", f"plain torch, {dev}", bench_torch_augment(images, dev, pipe_batch, pipe_timing))
    try:
        record("pipeline", f"Albumentations DataLoader, {os.cpu_count()} workers",
               bench_albumentations(images, labels, pipe_batch, pipe_timing))
    except ImportError:
        results["skipped"]["Albumentations loader"] = "not installed (pip install -e '.[baseline]')"

    print("model ...", flush=True)
    models = {key: prepare_model(cfg, env, key, results) for key in model_variants(cfg.device)}
    bench_model(cfg, env, models, timing, lambda key, row: record("model", key, row))
    print("traffic (Inductor's count of the compiled step's bytes: an estimate, not a timing) ...", flush=True)
    try:
        for key, row in traffic_rows(args.device, QUICK_BATCH if args.quick else BATCH):
            results["traffic"][key] = row
            print(f"  {traffic_line(key, row)}", flush=True)
            save()
    except RuntimeError as e:  # a count that fails is a finding to report, not a reason to lose the timings
        results["skipped"]["traffic"] = str(e)
    print("roofline (the Triton kernels' instructions from sm_90a machine code: an estimate, not a timing) ...",
          flush=True)
    try:
        results["roofline"] = roofline_rows(results["traffic"])
        for key, summary in results["roofline"].items():
            print(f"  {roofline_line(key, summary)}", flush=True)
        save()
    except (RuntimeError, ImportError) as e:  # no Triton, or a build that fails: reported, the rest kept
        results["skipped"]["roofline"] = str(e)
    print("end to end ...", flush=True)
    trainer_key = list(model_variants(cfg.device))[-1]  # the variant train.py runs, compile check and all
    e2e = bench_end_to_end(cfg, *models[trainer_key], images[:e2e_images], labels[:e2e_images], timing)
    if cpu:  # each CPU variant end to end too, side by side with the trainer's
        for key in list(model_variants(cfg.device))[:-1]:
            results["end_to_end_others"][key] = bench_end_to_end(cfg, *models[key], images[:e2e_images],
                                                                 labels[:e2e_images], timing)
            save()
    results["limit"] = bench_limit(args.device, 2 if not cpu else 4, timing["sync"], args.quick)
    same_model = results["model"][f"train, {trainer_key}"]["img_per_s"]  # the same variant, step alone
    if cpu and not cpu_kernels_missing():  # where the fused CPU step's time goes, a layer at a time
        fused = results["model"].get("train, eager fp32 channels_last, fused (C++ kernels)")
        results["layers"] = layer_rows(cfg.batch_size, cfg.dropout, timing, results["limit"]["matmul_tflops"],
                                       results["limit"]["copy_gb_per_s"], fused and 1e3 / fused["img_per_s"])
        save()
    results["end_to_end"] = {**e2e, "model": trainer_key, "ratio_to_model": e2e["img_per_s"] / same_model,
                             "fraction_of_floor": e2e["img_per_s"] / results["limit"]["floor_img_per_s"]}
    save()
    results["accuracy"] = accuracy(args.train, args.data, args.device)
    results["complete"] = True
    save()
    print("\n" + table(results))
    write_tensorboard(results, Path(args.tensorboard) / stem.name)
    print(f"\nwrote {stem}.json, {stem}.md and TensorBoard scalars in {Path(args.tensorboard) / stem.name}")
    return 0
