"""A sweep's plan file, read and checked before anything runs (bench/sweep.py runs it).

A plan holds named variants, one a line, `name: train.py flags` (the flags may be empty), and two reserved
lines: `seeds: 0 1 2` and `common: <flags for every variant>`; `#` starts a comment. Every line's flags are
parsed as train.py parses them and every variant's settings checked as train.py checks them: the first
mistake (an unknown flag, a bad value, a name used twice, a flag the sweep sets itself) is a one-line
UserError naming its line.
"""
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from engine.config import Config, UserError, check, flag, flag_parser, resolve

SWEEPS_OWN = ("seed", "runs", "name", "resume")  # flags the sweep sets for each run
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")  # a variant's name is part of its runs' folder names


@dataclass
class Plan:
    path: Path
    seeds: list
    common: list  # train.py flags, for every variant
    variants: dict = field(default_factory=dict)  # name -> its own flags, in the file's order

    def jobs(self):
        """(variant, seed, run name) in the order they run: every variant of a seed before the next seed."""
        return [(v, seed, f"{v}-s{seed}") for seed in self.seeds for v in self.variants]


def parse_flags(words, where):
    """train.py's flags as train.py parses them: {field: value}; a mistake is a UserError naming `where`."""
    parser = flag_parser()

    def refuse(message):
        raise UserError(f"{where}: {message}; fix that line of the plan")

    parser.error = refuse  # argparse's own messages ("unrecognized arguments: ..."), but one line and ours
    given = vars(parser.parse_args(words))
    own = [flag(k) for k in SWEEPS_OWN if k in given]
    if own:
        refuse(f"{', '.join(own)} {'is' if len(own) == 1 else 'are'} set by the sweep for each run (seeds: the "
               f"`seeds:` line)")
    return given


def read_plan(path, runs):
    """The plan in `path`, every line's flags parsed and every variant's settings checked as train.py checks
    them (into `runs`): the first mistake is a UserError naming its line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no plan file at {path}; pass one such as bench/plans/fast-15.txt")
    plan, given, lines = Plan(path, [0], []), {"common": {}}, {}
    for number_, raw in enumerate(path.read_text().splitlines(), 1):
        text = raw.split("#", 1)[0].strip()
        if not text:
            continue
        where = f"{path}:{number_}"
        name, colon, rest = (part.strip() for part in text.partition(":"))
        if not colon or not NAME.fullmatch(name):
            raise UserError(f"{where}: {text!r} is not `name: train.py flags` (a name of letters, digits, - _ . +); "
                            f"fix that line of the plan")
        if name == "seeds":
            seeds = rest.split()
            if not seeds or not all(s.isdigit() for s in seeds) or len(set(seeds)) < len(seeds):
                raise UserError(f"{where}: `seeds:` takes distinct whole numbers, such as `seeds: 0 1 2 3 4`")
            plan.seeds = [int(s) for s in seeds]
            continue
        if name in lines:
            raise UserError(f"{where}: a second {'`common:` line' if name == 'common' else f'variant named {name}'} "
                            f"(the first is at {lines[name]}); give it another name")
        try:
            words = shlex.split(rest)
        except ValueError as e:
            raise UserError(f"{where}: {e}; fix that line of the plan") from None
        given[name], lines[name] = parse_flags(words, where), where
        if name == "common":
            plan.common = words
        else:
            plan.variants[name] = words
    if not plan.variants:
        raise UserError(f"{path} names no variant; add lines such as `control:` and `no-dropout: --dropout 0`")
    for name in plan.variants:  # each run's settings, checked now rather than hours in
        try:
            settings = {**given["common"], **given[name]}  # a variant's flag over the common one, as in its command
            check(resolve(Config(**settings, seed=plan.seeds[0], runs=str(runs), name=".plan-check")))
        except UserError as e:
            raise UserError(f"{lines[name]} ({name}): {e}") from None
    return plan


def planned_config(plan, variant, seed, runs, name):
    """The settings train.py will resolve for one run of the plan."""
    given = {**parse_flags(plan.common, "common"), **parse_flags(plan.variants[variant], variant)}
    return resolve(Config(**given, seed=seed, runs=str(runs), name=name))
