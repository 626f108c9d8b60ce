"""Results over runs: finished runs grouped by their settings, each group's accuracy as mean ± std
over its seeds, and how many runs reached the target accuracy, in how many epochs and seconds.

What `results.py` prints (`make results`, and after `make train SEEDS="0 1 2"`) and the bench's
accuracy section reports. One run is one number; the strongest CIFAR speed runs report mean and
spread over many, and so does this.
"""
import json
import statistics
from pathlib import Path

# Settings that do not change what a run computes, or that tell runs of one experiment apart.
PER_RUN = {"seed", "name", "runs", "resume", "log_every", "threads", "checkpoint_every", "allow_other_data", "tta"}


def finished_runs(runs_dir):
    """The summary.json of every complete run under `runs_dir`, oldest first."""
    summaries = sorted(Path(runs_dir).glob("*/summary.json"), key=lambda p: p.stat().st_mtime)
    runs = [json.loads(p.read_text()) | {"run": p.parent.name} for p in summaries]
    return [r for r in runs if r.get("complete")]


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def settings_of(run):
    """What a run computed: its settings but the PER_RUN ones, with its device and train set size."""
    return {k: v for k, v in run["config"].items() if k not in PER_RUN} | {"device": run["device"],
                                                                         "train_images": run.get("train_images")}


def group_runs(runs, key=None):
    """[{"settings", "label", "n", "seeds", "final", "best", "final_tta", "final_val", "reached",
    "epochs_to_target", "seconds_to_target", "img_per_s", "curve", "val_curve"}], one per group.

    By default runs that differ only in PER_RUN fields (the seed, say) form a group, labelled by the
    settings that vary; `key(run)` -> label groups by anything else (the sweep: by variant).
    final/best/final_tta/final_val/epochs/seconds/img_per_s are (mean, std), std None for a single run
    (final_val: on the --val images; (None, None) without). curve and val_curve: the mean test
    (validation) accuracy after each epoch, over the runs that reached it."""
    groups = {}
    for r in runs:
        label = key(r) if key else json.dumps(settings_of(r), sort_keys=True)
        groups.setdefault(label, []).append(r)
    every = [settings_of(members[0]) for members in groups.values()]
    varying = {k for s in every for k in s if len({json.dumps(t.get(k)) for t in every}) > 1}
    shown = ["recipe", "device", "epochs", "batch_size", "train_images"]
    shown += sorted(varying - set(shown))
    out = []
    for label, members in groups.items():
        settings = settings_of(members[0])
        reached = [r for r in members if r["epoch_to_target"] is not None]
        epochs = max(len(r.get("history", [])) for r in members)
        curve, val_curve = ([mean_std([r["history"][e].get(metric) for r in members
                                       if len(r.get("history", [])) > e])[0] for e in range(epochs)]
                            for metric in ("test_acc", "val_acc"))
        out.append({"settings": settings, "n": len(members), "seeds": [r["config"]["seed"] for r in members],
                    "label": label if key else ", ".join(f"{settings[k]}" if k in ("recipe", "device")
                                                         else f"{k} {settings.get(k)}" for k in shown),
                    "final": mean_std([r["final_acc"] for r in members]),
                    "best": mean_std([r["best_acc"] for r in members]),
                    "final_tta": mean_std([r.get("final_tta_acc") for r in members]),
                    "final_val": mean_std([r.get("final_val_acc") for r in members]),
                    "target_acc": members[0]["target_acc"], "reached": len(reached),
                    "epochs_to_target": mean_std([r["epoch_to_target"] for r in reached]),
                    "seconds_to_target": mean_std([r["wall_s_to_target"] for r in reached]),
                    "img_per_s": mean_std([r.get("mean_train_img_per_s") for r in members]), "curve": curve,
                    "val_curve": val_curve if any(a is not None for a in val_curve) else []})
    return out


def number(ms, fmt):
    """(mean, std) as "mean ± std" in `fmt`, "mean" alone for one value, "—" for none."""
    mean, std = ms
    return "—" if mean is None else format(mean, fmt) + (f" ± {format(std, fmt)}" if std is not None else "")


def markdown_table(rows):
    """Rows of strings (the first, the header) as an aligned Markdown table."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def format_groups(groups):
    """The groups as a Markdown table, a row each."""
    rows = [("settings", "n", "final acc", "best acc", "reached target", "epochs to it", "seconds to it")]
    for g in groups:
        rows.append((g["label"], str(g["n"]), number(g["final"], ".2%"), number(g["best"], ".2%"),
                     f"{g['reached']} of {g['n']} ({g['target_acc']:.0%})", number(g["epochs_to_target"], ".1f"),
                     number(g["seconds_to_target"], ",.0f")))
    return markdown_table(rows)
