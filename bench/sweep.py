"""`python -m bench.sweep PLAN --runs DIR` (`make sweep PLAN=FILE RUNS=DIR`): a recipe search as one resumable
batch job, ranked in one table.

A plan file (bench/plan.py reads and checks it) names variants, one a line, `name: train.py flags`, and
the seeds (`seeds: 0 1 2`) and the flags every variant shares (`common:`). Every
(variant, seed) is one train.py run in DIR/<variant>-s<seed>, K at once (--parallel K; on a CPU at most
the idle cores, each with its share of them), every variant of the first seed before any second seed, so
that a sweep cut short still compares every variant. --budget-s N: past N seconds the running runs get
SIGTERM (they save and stop, as train.py does) and the sweep reports what it has. The same command again
skips finished runs and resumes cut ones. The runs share one compile cache (DIR/.cache).

As each run ends, and after each epoch of a running one, DIR/sweep.md and DIR/sweep.json are rewritten: one row
per variant, ranked by mean final validation accuracy where the runs hold images out (`--val N` in the plan:
choosing by test accuracy and then reporting it overstates it), by mean final test accuracy otherwise
(engine/results.py groups the runs); a variant none of whose runs has finished shows its furthest run's last
epoch, marked partial; below, the mean accuracy after each epoch, partial runs included, to compare at equal epochs;
each run's console output is in DIR/logs/, and `make tensorboard LOGDIR=DIR` overlays every run's curves.
A plan with a mistake (an unknown flag, a bad value, a name used twice) is one line naming the line,
exit 2, before anything runs.
"""
import argparse
import datetime
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from engine.checkpoint import write_atomic, write_json
from engine.cli import run_main
from engine.config import UserError, flag
from engine.device import idle_cores
from engine.results import PER_RUN, group_runs, markdown_table, number
from engine.run import ROOT

from .plan import planned_config, read_plan


def run_state(run_dir, planned):
    """"done", "cut" (a checkpoint to resume) or "new"; a folder whose settings are not the plan's is a UserError."""
    summary, last = run_dir / "summary.json", run_dir / "last.pt"
    saved = json.loads(summary.read_text())["config"] if summary.exists() else None
    if saved is not None:
        differ = [f"{flag(k)} {saved[k]} (the plan: {v})" for k, v in planned.__dict__.items()  # unset: resolved later
                  if k in saved and k not in PER_RUN and v is not None and saved[k] != v]
        if differ:
            raise UserError(f"{run_dir} was trained with other settings: {', '.join(differ[:3])}; sweep into another "
                            f"--runs folder, or remove that run")
        if json.loads(summary.read_text())["complete"]:
            return "done"
    return "cut" if last.exists() else "new"


class Sweep:
    """The runs of one plan in one folder: which are done, which run now, and the report."""

    def __init__(self, plan, runs, parallel, budget_s=None, out=None, clock=time.monotonic, trainer=ROOT / "train.py"):
        """`trainer`: the script each run executes: train.py (the tests pass a stand-in that keeps its contract:
        summary.json, last.pt, --resume, SIGTERM saves and exits 143)."""
        self.plan, self.runs, self.budget_s, self.out, self.clock = plan, Path(runs), budget_s, out or sys.stdout, clock
        self.trainer = trainer
        self.jobs = plan.jobs()
        self.planned = {name: planned_config(plan, v, seed, runs, name) for v, seed, name in self.jobs}
        self.state = {name: run_state(self.runs / name, self.planned[name]) for _, _, name in self.jobs}
        cpu = next(iter(self.planned.values())).device == "cpu"
        self.parallel, self.threads = parallel, None
        if cpu:  # each run gets its share of the cores idle now: torch's threads wait for each other at every op
            cores = idle_cores()
            self.parallel = max(1, min(parallel, cores))
            self.threads = max(1, cores // self.parallel)
        cache = self.runs / ".cache"  # one compile cache: the graphs every run of a shape builds are built once
        self.env = {**{k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")},
                    "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"), "TRITON_CACHE_DIR": str(cache / "triton"),
                    "PYTHONUNBUFFERED": "1"}
        self.signum, self.seen = None, {}

    def command(self, variant, seed, name):
        resume = self.state[name] == "cut"
        argv = ["--resume", str(self.runs / name)] if resume else \
            [*self.plan.common, *self.plan.variants[variant], "--seed", str(seed), "--runs", str(self.runs),
             "--name", name]
        threads = ["--threads", str(self.threads)] if self.threads else []  # a CPU's share (a resume may change it)
        return [sys.executable, str(self.trainer), *argv, *threads]

    def say(self, line):
        print(line, file=self.out, flush=True)

    def run(self):
        """Every run not done yet, `parallel` at a time; returns the exit code."""
        (self.runs / "logs").mkdir(parents=True, exist_ok=True)
        todo = [job for job in self.jobs if self.state[job[2]] != "done"]
        done = len(self.jobs) - len(todo)
        self.say(f"sweep {self.plan.path}: {len(self.plan.variants)} variants x {len(self.plan.seeds)} seeds = "
                 f"{len(self.jobs)} runs in {self.runs} ({done} done already), {self.parallel} at once"
                 + (f", {self.threads} CPU threads each" if self.threads else "")
                 + (f", budget {self.budget_s:g} s" if self.budget_s is not None else ""))
        self.report()
        handlers = {s: signal.signal(s, self.stop) for s in (signal.SIGINT, signal.SIGTERM)}
        running, t0, cut_by = {}, self.clock(), None
        try:
            while running or todo and cut_by is None:
                if cut_by is None and (self.signum or self.budget_s is not None and self.clock() - t0 > self.budget_s):
                    cut_by = "a signal" if self.signum else f"the budget of {self.budget_s:g} s"
                    for proc, *_ in running.values():  # once each: a second signal would make train.py quit unsaved
                        proc.terminate()
                while cut_by is None and todo and len(running) < self.parallel:
                    variant, seed, name = job = todo.pop(0)
                    log = open(self.runs / "logs" / f"{name}.log", "a")
                    argv = self.command(*job)
                    log.write(f"== {datetime.datetime.now():%Y-%m-%d %H:%M:%S} {shlex.join(argv)}\n")
                    log.flush()
                    # Its own session: Ctrl-C in the terminal reaches the sweep alone, which passes one SIGTERM on.
                    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=self.env,
                                            start_new_session=True)
                    running[name] = (proc, log, time.monotonic())
                    self.say(f"  {name}: {'resumed' if self.state[name] == 'cut' else 'started'}")
                for name, (proc, log, started) in list(running.items()):
                    if proc.poll() is not None:
                        log.close()
                        del running[name]
                        self.finished(name, proc.returncode, time.monotonic() - started)
                    elif self.new_epoch(name):  # the table follows a long run epoch by epoch
                        self.report()
                time.sleep(0.2)
        finally:
            for s, handler in handlers.items():
                signal.signal(s, handler)
        counts = {k: sum(v == k for v in self.state.values()) for k in ("done", "cut", "failed", "new")}
        self.say(f"{counts['done']} of {len(self.jobs)} runs done"
                 + "".join(f", {counts[k]} {what}" for k, what in (("cut", "cut"), ("failed", "failed"),
                                                                    ("new", "not started")) if counts[k])
                 + (f"; stopped by {cut_by}, the same command goes on from here" if cut_by else "")
                 + f"; table: {self.runs / 'sweep.md'}")
        if self.signum:
            return 128 + self.signum
        return 1 if counts["failed"] else 0

    def stop(self, signum, frame):
        self.signum = signum

    def new_epoch(self, name):
        """Whether run `name`'s summary.json changed since last asked (it is rewritten after each epoch)."""
        summary = self.runs / name / "summary.json"
        mtime = summary.stat().st_mtime_ns if summary.exists() else None
        changed, self.seen[name] = mtime != self.seen.get(name), mtime
        return changed and mtime is not None

    def finished(self, name, code, seconds):
        summary = self.runs / name / "summary.json"
        complete = code == 0 and summary.exists() and json.loads(summary.read_text())["complete"]
        stopped = code in (130, 143)  # by a signal: saved where it was, if it had started training
        saved = (self.runs / name / "last.pt").exists()
        self.state[name] = "done" if complete else "cut" if stopped and saved else "new" if stopped else "failed"
        what = {"done": "done", "cut": "cut (saved; resumed next time)", "new": "stopped before training",
                "failed": f"FAILED (exit {code}; log: {self.runs / 'logs' / (name + '.log')})"}[self.state[name]]
        acc = json.loads(summary.read_text())["final_acc"] if complete else None
        self.say(f"  {name}: {what} after {seconds:.0f} s" + (f", test accuracy {acc:.2%}" if acc is not None else ""))
        self.report()

    def report(self):
        """DIR/sweep.json and DIR/sweep.md from the plan's runs, rewritten whole: the finished ones, and for a
        variant with none finished its furthest run so far (`partial`)."""
        names = {name: variant for variant, _, name in self.jobs}
        summaries = {name: json.loads((self.runs / name / "summary.json").read_text()) | {"run": name}
                     for name in names if (self.runs / name / "summary.json").exists()}
        runs = [summaries[name] for name in names if self.state[name] == "done"]
        groups = {g["label"]: g for g in group_runs(runs, key=lambda r: names[r["run"]])}
        rows = []
        for variant, words in self.plan.variants.items():
            states = [self.state[name] for name, v in names.items() if v == variant]
            g = groups.get(variant, {"n": 0})
            rows.append({"variant": variant, "flags": shlex.join(words),
                         "runs": {k: states.count(k) for k in ("done", "cut", "failed", "new")},
                         **{k: v for k, v in g.items() if k not in ("settings", "label")}})
            unfinished = [s for name, s in summaries.items() if names[name] == variant and self.state[name] != "done"
                          and s["history"]]
            if not g["n"] and unfinished:
                furthest = max(unfinished, key=lambda s: len(s["history"]))
                h = furthest["history"]
                rows[-1]["partial"] = {"run": furthest["run"], "epoch": h[-1]["epoch"],
                                       "epochs": furthest["config"]["epochs"], "test_acc": h[-1]["test_acc"],
                                       "val_acc": h[-1].get("val_acc"), "curve": [e["test_acc"] for e in h],
                                       "val_curve": [e["val_acc"] for e in h if "val_acc" in e]}
        by = "final_val" if any(c.val for c in self.planned.values()) else "final"  # a plan holding images out
        rows.sort(key=lambda r: -(r[by][0] if r["n"] and r[by][0] is not None else -1))  # stable: the rest as planned
        target = next(iter(self.planned.values())).target_acc
        data = {"plan": str(self.plan.path), "runs": str(self.runs), "seeds": self.plan.seeds, "ranked_by": by,
                "common": shlex.join(self.plan.common), "target_acc": target,
                "updated": datetime.datetime.now().isoformat(timespec="seconds"), "variants": rows}
        write_json(data, self.runs / "sweep.json")
        write_atomic(self.runs / "sweep.md", lambda tmp: Path(tmp).write_text(sweep_markdown(data) + "\n"))


def sweep_markdown(data):
    """The ranked table, then the mean accuracy after each epoch (validation, then test), as Markdown."""
    pct = ".2%"
    head = ("rank", "variant", "flags", "n", "final val acc", "final test acc", "best test acc", "final, flip TTA",
            f"reached {data['target_acc']:.0%}", "epochs to it", "seconds to it", "img/s", "runs")
    table = [head]
    for i, r in enumerate(data["variants"], 1):
        runs = ", ".join(f"{n} {k if k != 'new' else 'to run'}" for k, n in r["runs"].items() if n)
        if not r["n"]:
            p = r.get("partial", {})
            at = [f"partial: {p[k]:.2%} at epoch {p['epoch']} of {p['epochs']}" if p.get(k) is not None else "—"
                  for k in ("val_acc", "test_acc")]
            table.append(("—", r["variant"], r["flags"] or "—", "0", *at, *["—"] * 6, runs))
            continue
        table.append((str(i), r["variant"], r["flags"] or "—", str(r["n"]), number(r["final_val"], pct),
                      number(r["final"], pct), number(r["best"], pct),
                      number(r["final_tta"], pct), f"{r['reached']} of {r['n']}", number(r["epochs_to_target"], ".1f"),
                      number(r["seconds_to_target"], ",.0f"), number(r["img_per_s"], ",.0f"), runs))
    ranked = "validation" if data["ranked_by"] == "final_val" else "test"
    lines = [f"# Sweep: {data['plan']}", "",
             f"Runs in `{data['runs']}` (curves: `make tensorboard LOGDIR={data['runs']}`); seeds {data['seeds']}; "
             f"every variant with `{data['common'] or 'no common flags'}`; ranked by mean final {ranked} accuracy, "
             f"mean ± std over the finished runs (unranked: none finished yet); updated {data['updated']}.", "",
             markdown_table(table)]
    for key, what in (("val_curve", "validation"), ("curve", "test")):
        curves = [(r["variant"], r[key]) for r in data["variants"] if r.get(key)]
        curves += [(f"{r['variant']} (partial: {r['partial']['run']})", r["partial"][key])
                   for r in data["variants"] if not r["n"] and r.get("partial", {}).get(key)]
        epochs = max([len(c) for _, c in curves] + [0])
        if epochs:
            rows = [("variant", *(str(e) for e in range(1, epochs + 1)))]
            rows += [(name, *(f"{a:.1%}" if a is not None else "—" for a in c), *["—"] * (epochs - len(c)))
                     for name, c in curves]
            lines += ["", f"Mean {what} accuracy after each epoch:", "", markdown_table(rows)]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("plan", help="the plan file (bench/plans/fast-15.txt, say)")
    parser.add_argument("--runs", required=True, help="the folder every run of the sweep goes into, and its table")
    parser.add_argument("--parallel", type=int, default=1, help="runs at once (one GPU holds several; on a CPU at "
                        "most the idle cores; default 1)")
    parser.add_argument("--budget-s", type=float, default=None, help="past this many seconds, the running runs save "
                        "and stop, and the sweep reports what it has (default: no limit)")
    args = parser.parse_args(argv)
    if args.parallel < 1 or args.budget_s is not None and args.budget_s < 0:
        parser.error("--parallel is at least 1 and --budget-s at least 0")
    return run_main(lambda _: Sweep(read_plan(args.plan, args.runs), args.runs, args.parallel, args.budget_s).run())


if __name__ == "__main__":
    sys.exit(main())
