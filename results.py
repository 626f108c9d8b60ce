"""Results over runs: `python results.py [runs]` (`make results`): the finished runs under runs/,
grouped by their settings, with mean ± std of final and best test accuracy over each group's
seeds and how many runs reached the target accuracy (and in how many epochs and seconds).

`make train SEEDS="0 1 2 3 4"` trains once per seed, then prints this for the folder the runs went
to: `results.py --as-trained <train.py's flags>` reads it from the flags as train.py does.
"""
import argparse
import sys
from pathlib import Path

from engine.cli import run_main
from engine.errors import UserError
from engine.results import finished_runs, format_groups, group_runs


def main(argv=None):
    parser = argparse.ArgumentParser(prog="results.py", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="?", default="runs", help="the folder of run folders (default: runs)")
    parser.add_argument("--as-trained", nargs=argparse.REMAINDER, metavar="FLAGS",
                        help="the rest are train.py's flags: the folder is the one it trained into (its --runs, or the "
                             "parent of its --resume)")
    args = parser.parse_args(argv)
    if args.as_trained is not None:
        from engine.config import Config, flag_parser  # here: it loads torch, which the rest has no need of

        flags = vars(flag_parser().parse_args(args.as_trained))
        args.runs = str(Path(flags["resume"]).parent) if "resume" in flags else flags.get("runs", Config.runs)
    if not Path(args.runs).is_dir():
        raise UserError(f"{args.runs} is not a folder of runs; train first (make train), or name the folder")
    runs = finished_runs(args.runs)
    if not runs:
        print(f"no finished runs under {args.runs} yet (a run is finished when its summary.json says complete)")
        return 0
    groups = group_runs(runs)
    print(f"{len(runs)} finished run{'s' * (len(runs) != 1)} under {args.runs}, in {len(groups)} "
          f"group{'s' * (len(groups) != 1)} of settings "
          f"(mean ± std over a group's seeds)\n")
    print(format_groups(groups))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
