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


def group_runs(runs):
    """[{"settings", "label", "n", "seeds", "final", "best", "reached", "epochs_to_target", "seconds_to_target"}],
    one per distinct setting: runs that differ only in PER_RUN fields (the seed, say) form a group.
    final/best/epochs/seconds are (mean, std); std is None for a single run."""
    groups = {}
    for r in runs:
        settings = {k: v for k, v in r["config"].items() if k not in PER_RUN} | {"device": r["device"],
                                                                                  "train_images": r.get("train_images")}
        groups.setdefault(json.dumps(settings, sort_keys=True), (settings, []))[1].append(r)
    varying = {k for settings, _ in groups.values() for k in settings
               if len({json.dumps(s.get(k)) for s, _ in groups.values()}) > 1}
    out = []
    for settings, members in groups.values():
        reached = [r for r in members if r["epoch_to_target"] is not None]
        shown = ["recipe", "device", "epochs", "batch_size", "train_images"] + sorted(varying - {"recipe", "device", "epochs",
                                                                                                "batch_size", "train_images"})
        label = ", ".join(f"{settings[k]}" if k in ("recipe", "device") else f"{k} {settings.get(k)}" for k in shown)
        out.append({"settings": settings, "label": label, "n": len(members), "seeds": [r["config"]["seed"] for r in members],
                    "final": mean_std([r["final_acc"] for r in members]), "best": mean_std([r["best_acc"] for r in members]),
                    "target_acc": members[0]["target_acc"], "reached": len(reached),
                    "epochs_to_target": mean_std([r["epoch_to_target"] for r in reached]),
                    "seconds_to_target": mean_std([r["wall_s_to_target"] for r in reached])})
    return out


def format_groups(groups):
    """The groups as a Markdown table, a row each."""
    def num(ms, fmt):
        mean, std = ms
        return "—" if mean is None else format(mean, fmt) + (f" ± {format(std, fmt)}" if std is not None else "")

    rows = [("settings", "n", "final acc", "best acc", "reached target", "epochs to it", "seconds to it")]
    for g in groups:
        rows.append((g["label"], str(g["n"]), num(g["final"], ".2%"), num(g["best"], ".2%"),
                     f"{g['reached']} of {g['n']} ({g['target_acc']:.0%})", num(g["epochs_to_target"], ".1f"),
                     num(g["seconds_to_target"], ",.0f")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
