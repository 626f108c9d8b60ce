"""The roofline's report, and the command that makes it (`python -m bench.roofline`, whose flags are `main`'s).

`run` counts each variant (bench/roofline.py) beside the traffic rows and writes the results: JSON, the Markdown
tables (`report`) and the picture (`picture`). `roofline_rows` and `roofline_line` are the row the bench shows.
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

from engine.checkpoint import write_atomic, write_json
from engine.cli import run_main
from engine.config import UserError
from engine.run import ROOT

from . import roofline
from .roofline import BATCH, DROPOUT, GPUS, VARIANTS, count_variant, per_layer, picked, summary


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


# --- the bench's roofline row --------------------------------------------------------------------------------------

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


# --- the command: python -m bench.roofline -------------------------------------------------------------------------

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
    parser = argparse.ArgumentParser(prog="python -m bench.roofline", description=roofline.__doc__.splitlines()[0])
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
