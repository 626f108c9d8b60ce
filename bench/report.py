"""The bench's report: the Markdown table with its notes, TensorBoard scalars, and the accuracy
section: the newest training run's summary.json, and every finished run grouped by settings
(mean ± std over seeds, engine/results.py)."""
import json
import subprocess
import sys

from engine.results import finished_runs, format_groups, group_runs
from engine.run import ROOT

from .layers import layers_table
from .roofline_report import roofline_line
from .traffic import traffic_line


def accuracy(train_first, data, device):
    if train_first:
        subprocess.run([sys.executable, str(ROOT / "train.py"), "--data", data, "--device", device], check=True,
                       cwd=ROOT)
    summaries = sorted((ROOT / "runs").glob("*/summary.json"), key=lambda p: p.stat().st_mtime)
    if not summaries:
        return None
    s = json.loads(summaries[-1].read_text())
    return {"run": str(summaries[-1].parent.relative_to(ROOT)), "device": s["device"], "best_acc": s["best_acc"],
            "epochs_run": s["epochs_run"], "epoch_to_target": s["epoch_to_target"],
            "wall_s_to_target": s["wall_s_to_target"], "target_acc": s["target_acc"], "data": s["config"]["data"],
            "smoke": s["config"]["smoke"], "train_images": s.get("train_images"), "test_images": s.get("test_images"),
            "groups": group_runs(finished_runs(ROOT / "runs"))}  # every finished run, mean ± std over seeds


def figure(v):
    """Images/second as a person reads them: thousands separated, small rates with the digits they need."""
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def table(results):
    """The report as Markdown, from whatever `results` holds so far (a bench cut short still reports)."""
    rows = [("stage", "what", "img/s (median)", "min - max", "batch")]
    for stage in ("pipeline", "model"):
        for what, r in results[stage].items():
            rows.append((stage, what, figure(r["img_per_s"]), f"{figure(r['min'])} - {figure(r['max'])}",
                         str(r["batch"])))
    e = results.get("end_to_end")
    if e:
        rows.append(("end to end", f"train_epoch on DALI raw ({e['model']})", figure(e["img_per_s"]),
                     f"{figure(e['min'])} - {figure(e['max'])}", str(e["batch"])))
    for key, o in results.get("end_to_end_others", {}).items():
        rows.append(("end to end", f"train_epoch on DALI raw ({key})", figure(o["img_per_s"]),
                     f"{figure(o['min'])} - {figure(o['max'])}", str(o["batch"])))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines.append("")
    costs = results["costs"]
    if "augment draws" in costs:
        d = costs["augment draws"]
        lines.append(f"- augmentation parameters drawn with numpy: {d['ms']:.3f} ms per batch of {d['batch']} "
                     f"({d['min']:.3f} - {d['max']:.3f})")
    for what, c in costs.items():
        if what.startswith("augmentation host cost"):
            costs = " / ".join(f"{r['cost_ms']:.2f}" for r in c["batches"].values())
            batches = " / ".join(f"{int(b):,}" for b in c["batches"])
            growth = ", ".join(f"x{g:.1f}" if g else "—" for g in c["growth_per_doubling"])
            lines.append(f"- {what}: {costs} ms per batch of {batches} (the graph on 1x1 images, augmented minus "
                         f"plain; {growth} per doubling of the batch: x2 is linear, x4 quadratic)")
        if what.startswith("epoch start"):
            lines.append(f"- {what}: {c['build_ms']:.1f} ms to build the pipeline (first epoch), {c['reset_ms']:.1f} "
                         f"ms to reset it (every later epoch), to the first batch of {c['batch']}")
    for key, c in results.get("convs", {}).items():
        if set(c["impl"].values()) != {"torch"} or c["ms"]:
            lines.append(f"- convs ({key}): {c['line']}" + "".join(f"; {note}" for note in c["notes"]))
    for key, f in results.get("fuse", {}).items():
        if f["fused"] or f["ms"]:
            lines.append(f"- fused ({key}): {f['line']}")
    for key, c in results["compile"].items():
        lines.append(f"- compile check ({key}): " + (
            f"{c['graphs']} graphs in {c['seconds']:.1f} s; relative error against fp32 eager {c['error']:.2e} "
            f"(eager at training precision {c['eager_error']:.2e})" if c["compiled"] else c["note"]))
    if e:
        lines.append(f"- end to end / the same model variant alone: **{e['ratio_to_model']:.2f}** (the pipeline's and "
                     f"the loop's cost; epochs of {e['images_per_epoch']:,} images, recipe `{results['recipe']}`)")
    lim = results.get("limit")
    if lim and e:
        lines += [f"- limit: {lim['train_flops_per_image'] / 1e6:,.0f} MFLOP and "
                  f"{lim['train_bytes_per_image'] / 1e6:,.1f} MB "
                  f"per training image; measured {lim['matmul_tflops']:,.2f} TFLOP/s matmul and "
                  f"{lim['copy_gb_per_s']:,.1f} GB/s copy -> floor {figure(lim['floor_img_per_s'])} img/s "
                  f"(compute {figure(lim['compute_bound_img_per_s'])}, memory "
                  f"{figure(lim['memory_bound_img_per_s'])}); "
                  f"end to end reaches **{e['fraction_of_floor']:.1%}** of it",
                  "  (bytes: every conv output saved in forward, read in backward, its gradient written and read, "
                  "at the training dtype, plus the uint8 image)"]
        if "bf16_matmul_tflops" in lim:
            lines.append(f"  (bf16 matmul here: {lim['bf16_matmul_tflops'] * 1e3:,.2f} GFLOP/s, "
                         + ("native bf16)" if lim["bf16"] == "native" else "no native bf16 on this CPU: PyTorch's "
                            "reference loop, so the CPU trains fp32)"))
    if results.get("layers"):
        lines += ["- the fused CPU step a layer at a time, forward + backward per image, beside each layer's floor "
                  "(its FLOPs at the matmul rate or its bytes at the copy bandwidth above; bench/layers.py):", "",
                  layers_table(results["layers"]), ""]
    if results.get("traffic"):
        lines.append("- traffic, the compiled training step's bytes per image as Inductor counts them after fusion "
                     "(an estimate, not a timing; bench/traffic.py):")
        lines += [f"  - {traffic_line(key, row)}; largest kernel {row['top'][0]['bytes_per_image'] / 1e6:.2f} MB: "
                  f"{row['top'][0]['kernel']}" for key, row in results["traffic"].items()]
    if results.get("roofline"):
        lines.append("- roofline, the Triton kernels' warp-instructions per image counted from their sm_90a machine "
                     "code and the step they allow (an estimate, not a timing; bench/roofline.py, docs/bench.md):")
        lines += [f"  - {roofline_line(key, row)}" for key, row in results["roofline"].items()]
    if "accuracy" in results:
        acc = results["accuracy"]
        if acc:
            reached = (f"{acc['target_acc']:.0%} at epoch {acc['epoch_to_target']} ({acc['wall_s_to_target']:.0f} s)"
                       if acc["epoch_to_target"] else f"{acc['target_acc']:.0%} not reached")
            size = f"{acc['train_images']:,} train / {acc['test_images']:,} test images" if acc["train_images"] \
                else "data size not recorded"
            lines.append(f"- accuracy of the newest run ({acc['run']}, {acc['device']}, {size}, {acc['epochs_run']} "
                         f"epochs{', generated smoke data' if acc['smoke'] else ''}): "
                         f"best {acc['best_acc']:.2%}; {reached}")
            if acc.get("groups"):
                lines += ["- accuracy over the finished runs under runs/, grouped by settings (mean ± std over seeds; "
                          "`make train SEEDS=\"0 1 2 3 4\"` adds runs):", "", format_groups(acc["groups"]), ""]
        else:
            lines.append("- accuracy: no training run found under runs/ (run `make train`, or `make bench "
                         "ARGS=--train`)")
    lines += [f"- skipped: {k}: {v}" for k, v in results["skipped"].items()]
    if not results["complete"]:
        lines.append("- **incomplete**: the bench stopped before the end; the rows above are what it measured")
    lines.append(f"- {results['device']}, torch {results['torch']}, DALI {results['dali']}, commit "
                 f"{results['commit']}, {results['date']}; data: {results['data']}")
    return "\n".join(lines)


def write_tensorboard(results, folder):
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(folder) as w:
        for stage in ("pipeline", "model"):
            for what, r in results[stage].items():
                w.add_scalar(f"{stage}/{what}", r["img_per_s"], 0)
        w.add_scalar("end_to_end/img_per_s", results["end_to_end"]["img_per_s"], 0)
        w.add_scalar("end_to_end/ratio_to_model", results["end_to_end"]["ratio_to_model"], 0)
        w.add_scalar("limit/fraction_of_floor", results["end_to_end"]["fraction_of_floor"], 0)
