"""`make gpu-check` (`python -m bench.gpu_check --out DIR`): what a CUDA machine's few minutes are for.

One command, one report (DIR/report.md, and report.json beside it), written section by section
as each finishes, so a run that is cut short keeps what it found. The sections, in the order they
run (`--sections` picks some, in this order; versions always come first):
- fused-tests: the fused path's CUDA tests first (tests/test_fused.py: each fused op against its definition in
  float64 and the whole fused step against the unfused model, fp32 and bf16, dropout on and off, batch 64, 32x32):
  the kernels the interpreter cannot run as built (the bf16 tl.dot path), before anything trusts them;
- kernels: the project's Triton kernels against F.conv2d on every depthwise and grouped conv of
  the model, forward and both gradients, bf16 and fp32, both layouts, at batch 512: before
  anything is timed; then the tile autotune picked for each kernel and shape;
- fused: the fused path's start-up check (net/fused.py against the unfused model in float64, every tensor, dropout
  0 and the recipe's) in fp32 (the verdict: autocast and TF32 off) and bf16 (for the record), then whole
  training steps fused against unfused, compiled bf16 channels_last, at batch 512;
- convs: every conv alone in each implementation, beside its memory time (`python -m bench.convs`),
  and the profiler's top kernels over the trainer's eager steps;
- steps: the train step alone in every bench variant (eager and compiled, channels_last and
  NCHW, torch and Triton convs), each through the trainer's conv choice and compile check;
- pipelines: the DALI GPU pipeline alone: raw and encoded sources, with and without
  augmentation, each augmentation alone, and the cost of the numpy parameter draws;
- tests: the other CUDA tests (`pytest -m cuda`), which must run, not skip, cut after --tests-timeout;
- bench: the whole bench (`python -m bench`), its table and files in DIR/bench/.
Without CUDA it exits at once with one line. On one H100 (2026-11-26) the bench alone took 161 s.

Each section's work, as (Markdown lines, data), is in bench/gpu_check_sections.py.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

from engine.run import ROOT

from .gpu_check_sections import bench, conv_breakdown, cuda_tests, fused, kernels, pipelines, steps, versions

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


FUSED_TESTS = "tests/test_fused.py"  # run first, alone: each fused op and the whole fused step on the GPU
SECTIONS = ("fused-tests", "kernels", "fused", "convs", "steps", "pipelines", "tests", "bench")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu-check", help="folder for the report (default: gpu-check)")
    parser.add_argument("--data", default=str(SHARED_JPEG) if SHARED_JPEG.exists() else "data",
                        help="CIFAR-10 for the tests, pipelines and bench: the JPEG copy (default: ../shared/data's, "
                             "else data/; on a GPU box from device-pack, /tmp/dc/x/cifar10-jpeg.tar.gz)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"which sections, comma-separated, run in this order: {', '.join(SECTIONS)} "
                             "(default: all)")
    parser.add_argument("--skip-bench", action="store_true", help="every section but the bench")
    parser.add_argument("--tests-timeout", type=int, default=420,
                        help="seconds the CUDA tests may take before the check goes on without them (default: 420)")
    args = parser.parse_args(argv)
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    if set(wanted) - set(SECTIONS) or not wanted:
        parser.error(f"--sections takes some of {', '.join(SECTIONS)}, not {args.sections!r}")
    if args.skip_bench:
        wanted = [s for s in wanted if s != "bench"]
    if not torch.cuda.is_available():
        print(f"error: make gpu-check needs a CUDA device, and torch {torch.__version__} sees none here; run it on "
              f"a GPU machine", file=sys.stderr)
        return 2
    report, t0 = Report(args.out), time.perf_counter()
    report.section("versions", "Versions and device", *versions())
    run = {"kernels": lambda: report.section("kernels", "Triton kernels against F.conv2d", *kernels()),
           "fused": lambda: report.section("fused", "The fused path against the unfused model, then timed", *fused()),
           "convs": lambda: report.section("convs", "Each conv alone, each implementation", *conv_breakdown()),
           "steps": lambda: report.section("steps", "Train step alone, every variant", *steps()),
           "pipelines": lambda: report.section("pipelines", "DALI on the GPU, alone (batch 1024)",
                                               *pipelines(args.data)),
           "fused-tests": lambda: report.section("fused_cuda_tests", f"CUDA tests of the fused path ({FUSED_TESTS})",
                                                 *cuda_tests(report.out, args.data, args.tests_timeout,
                                                             paths=(FUSED_TESTS,), stem="fused-cuda-tests")),
           "tests": lambda: report.section("cuda_tests", "The other CUDA tests",
                                           *cuda_tests(report.out, args.data, args.tests_timeout,
                                                       ignore=(FUSED_TESTS,))),
           "bench": lambda: report.section("bench", "Bench", *bench(report.out, args.data))}
    for name in SECTIONS:
        if name in wanted:
            run[name]()
    print(f"gpu-check done in {time.perf_counter() - t0:.0f} s: {report.out / 'report.md'}")
    failed = [k for k in ("fused_cuda_tests", "kernels", "fused", "cuda_tests")
              if k in report.data and not report.data[k]["ok"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
