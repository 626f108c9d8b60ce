"""`make gpu-check` (`python -m bench.gpu_check --out DIR`): what a CUDA machine's few minutes are for.

One command, one report (DIR/report.md, and report.json beside it), written section by section
as each finishes, so a run that is cut short keeps what it found:
1. versions and device;
2. the CUDA tests (`pytest -m cuda`), which must run, not skip, cut after --tests-timeout;
3. the DALI GPU pipeline alone: raw and encoded sources, with and without augmentation, each
   augmentation alone, and the cost of the numpy parameter draws;
4. the compile check as train.py runs it: graphs built, compile time, compiled and eager bf16
   error against fp32; then the compiled train step alone;
5. the bench (`python -m bench`), its table and files in DIR/bench/.
Without CUDA it exits at once with one line. On one H100 (2026-11-26) section 5 alone took
161 s; the CUDA tests have not yet run uncontended.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_JPEG = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


class Report:
    """Markdown sections appended to DIR/report.md (and a dict to report.json) as they finish."""

    def __init__(self, out):
        self.out, self.data = Path(out), {}
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "report.md").write_text(f"# gpu-check, {time.strftime('%Y-%m-%d %H:%M')}\n")

    def section(self, key, title, lines, data):
        text = f"\n## {title}\n\n" + "\n".join(lines) + "\n"
        print(text, flush=True)
        with open(self.out / "report.md", "a") as f:
            f.write(text)
        self.data[key] = data
        (self.out / "report.json").write_text(json.dumps(self.data, indent=2, default=str))


def versions():
    import nvidia.dali

    from engine.run import git_commit

    props = torch.cuda.get_device_properties(0)
    facts = {"device": torch.cuda.get_device_name(0), "memory_gib": round(props.total_memory / 2**30, 1),
             "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
             "dali": nvidia.dali.__version__, "python": platform.python_version(),
             "commit": git_commit() or "unknown (no git here: record it by hand)"}
    return [f"- {k}: {v}" for k, v in facts.items()], facts


def cuda_tests(out, data, timeout):
    xml = out / "cuda-tests.xml"
    t0 = time.perf_counter()
    env = {**os.environ, **({"CIFAR10_JPEG": str(Path(data).resolve())} if Path(data).is_file() else {})}
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-v", "-rfEs", "-p", "no:cacheprovider",
               f"--junitxml={xml.resolve()}"]
    try:  # -v: a cut-short log still names each test that finished
        r = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout)
        returncode, stdout, stderr = r.returncode, r.stdout, r.stderr
    except subprocess.TimeoutExpired as e:  # a hung test must not take the rest of the check with it
        returncode, stdout, stderr = None, text_of(e.stdout), text_of(e.stderr)
    (out / "cuda-tests.log").write_text(stdout + stderr)
    suite = ET.parse(xml).getroot().find("testsuite") if xml.exists() else None
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")} if suite is not None else {}
    ok = returncode == 0 and counts.get("tests", 0) > 0 and counts.get("skipped", 1) == 0
    verdict = "PASS" if ok else "FAIL" if returncode is not None else f"TIMEOUT after {timeout} s"
    lines = [f"- {verdict}: {counts} in {time.perf_counter() - t0:.0f} s (every CUDA test must run: "
             f"a skip counts as a failure here); log: cuda-tests.log"]
    lines += [f"  - {line}" for line in stdout.splitlines() if line.startswith(("FAILED", "ERROR", "SKIPPED"))][:30]
    if returncode is None:
        lines += [f"  - finished before the cut: {line}" for line in stdout.splitlines() if line.endswith("]")
                  and ("PASSED" in line or "FAILED" in line)][:30]
    return lines, {"ok": ok, "timed_out": returncode is None, **counts}


def text_of(output):
    """TimeoutExpired's captured output: bytes even under text=True on some Pythons, or None."""
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def pipelines(data):
    from bench.pipelines import bench_dali, bench_data, bench_draws
    from pipelines import Augment

    images, labels, blobs, what = bench_data(data, n_encoded=20_000, n_synthetic=50_000)
    timing = dict(repeats=5, warmup=4, steps=20, sync=torch.cuda.synchronize)
    rows = {"augment draws (ms per 512)": bench_draws()["ms"]}
    off = dict(flip_p=0, ssr_p=0, cutout_p=0)
    # Each augmentation alone too: on an H100 (2026-11-26) the augmented raw graph ran at 89k img/s
    # against 631k without augmentation, and which operator takes the 10 ms per batch is the question.
    for name, (x, y, aug) in {"raw, augmented": (images, labels, Augment()), "raw, no augmentation": (images, labels, None),
                              "raw, flip only": (images, labels, Augment(**{**off, "flip_p": 0.5})),
                              "raw, shift-scale-rotate only": (images, labels, Augment(**{**off, "ssr_p": 0.5})),
                              "raw, cutout only": (images, labels, Augment(**{**off, "cutout_p": 0.5})),
                              "encoded (nvJPEG), augmented": (blobs, labels[:len(blobs)], Augment()),
                              "encoded (nvJPEG), no augmentation": (blobs, labels[:len(blobs)], None)}.items():
        rows[f"DALI {name}, img/s"] = bench_dali(x, y, "cuda", 1024, timing, augment=aug)["img_per_s"]
    return [f"- data: {what}"] + [f"- {k}: {v:,.3f}" if v < 100 else f"- {k}: {v:,.0f}" for k, v in rows.items()], rows


def compile_and_step():
    from bench.model import synthetic_batches
    from bench.timing import measure
    from engine.config import Config, resolve
    from engine.device import compile_checked, setup_env
    from engine.loop import make_optimizer, train_step
    from net import build_model

    cfg = resolve(Config(device="cuda"))
    env = setup_env(cfg)
    model = build_model(dropout=cfg.dropout).to(env.device, memory_format=torch.channels_last)
    check = compile_checked(model, env, eval_batch=cfg.eval_batch_size, train_batch=cfg.batch_size, mode=cfg.compile_mode)
    optimizer, batches, i = make_optimizer(cfg, check.model), synthetic_batches("cuda", cfg.batch_size, env.dtype, True), [0]

    def step():
        x, y = batches[i[0] % len(batches)]
        i[0] += 1
        train_step(check.model, optimizer, x, y, label_smoothing=cfg.label_smoothing, autocast=env.autocast)

    rate = measure(step, images_per_step=cfg.batch_size, steps=50, repeats=5, warmup=10, sync=torch.cuda.synchronize)
    data = {"compiled": check.compiled, "graphs": check.graphs, "compile_s": check.seconds, "error": check.error,
            "eager_error": check.eager_error, "note": check.note, "train_step_img_per_s": rate["img_per_s"]}
    lines = [f"- compiled: {check.compiled}" + (f" ({check.note})" if check.note else ""),
             f"- graphs built: {check.graphs} (the trainer needs exactly 2), in {check.seconds:.1f} s",
             f"- relative error against fp32 eager: compiled {check.error:.2e}, eager bf16 {check.eager_error:.2e}",
             f"- train step alone ({'compiled' if check.compiled else 'eager'} bf16 channels_last, batch "
             f"{cfg.batch_size}): {rate['img_per_s']:,.0f} img/s ({rate['min']:,.0f} - {rate['max']:,.0f})"]
    return lines, data


def bench(out, data):
    r = subprocess.run([sys.executable, "-m", "bench", "--device", "cuda", "--data", data, "--out", str(out / "bench"),
                        "--tensorboard", str(out / "bench" / "tensorboard")], cwd=ROOT, capture_output=True, text=True)
    (out / "bench.log").write_text(r.stdout + r.stderr)
    tables = sorted((out / "bench").glob("*.md"))
    lines = tables[-1].read_text().splitlines() if tables else []
    return [f"- exit {r.returncode}; log: bench.log", ""] + lines, {"exit": r.returncode}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu-check", help="folder for the report (default: gpu-check)")
    parser.add_argument("--data", default=str(SHARED_JPEG) if SHARED_JPEG.exists() else "data",
                        help="CIFAR-10 for the tests, pipelines and bench: the JPEG copy (default: ../shared/data's, "
                             "else data/; on a GPU box from device-pack, /tmp/dc/x/cifar10-jpeg.tar.gz)")
    parser.add_argument("--skip-bench", action="store_true", help="stop after section 4")
    parser.add_argument("--tests-timeout", type=int, default=420,
                        help="seconds the CUDA tests may take before the check goes on without them (default: 420)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"error: make gpu-check needs a CUDA device, and torch {torch.__version__} sees none here; run it on "
              f"a GPU machine", file=sys.stderr)
        return 2
    report, t0 = Report(args.out), time.perf_counter()
    report.section("versions", "Versions and device", *versions())
    report.section("cuda_tests", "CUDA tests", *cuda_tests(report.out, args.data, args.tests_timeout))
    report.section("pipelines", "DALI on the GPU, alone (batch 1024)", *pipelines(args.data))
    report.section("compile", "Compile check and train step", *compile_and_step())
    if not args.skip_bench:
        report.section("bench", "Bench", *bench(report.out, args.data))
    print(f"gpu-check done in {time.perf_counter() - t0:.0f} s: {report.out / 'report.md'}")
    return 0 if report.data["cuda_tests"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
