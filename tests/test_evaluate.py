"""evaluate.py (`make eval`) as a user runs it, on a finished run."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import evaluate as evaluate_script
from engine.cli import run_main
from engine.config import UserError

ROOT = Path(__file__).resolve().parents[1]


def evaluate(*args):
    return subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


@pytest.mark.xdist_group("short")
def test_evaluate_gives_the_numbers_the_trainer_logged_plain_and_with_flip_tta(short_run):
    run, _ = short_run
    r = evaluate(run, "--tta")
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((run / "summary.json").read_text())
    assert s["best_weights"] == "raw"  # the average's 3 steps did not beat them: best.pt's best are the final weights
    logged = s["history"][-1]["test_acc"]  # best.pt was saved at the last (only) epoch
    assert f"test accuracy: {logged:.2%} (the trainer logged {logged:.2%} for this checkpoint)" in r.stdout
    assert f"with flip TTA: {s['final_tta_acc']:.2%}" in r.stdout  # the trainer's own --tta, on the same weights
    lines = r.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("class"))
    assert lines[header].split() == ["class", "plain", "flip", "TTA"] and lines[header + 1].startswith("airplane")
    assert len(lines[header + 10].split()) == 3  # truck, plain, TTA
    png = run / "best.confusion.png"
    assert f"confusion matrix: {png}" in r.stdout and Image.open(png).size[0] >= 600


@pytest.mark.xdist_group("short")
def test_the_weight_average_is_evaluated_as_the_trainer_evaluated_it(short_run, capsys):
    run, _ = short_run
    # in-process: the CLI is above
    assert evaluate_script.main([str(run), "--checkpoint", "last", "--weights", "ema"]) == 0
    out = capsys.readouterr().out
    logged = json.loads((run / "summary.json").read_text())["history"][-1]["ema_test_acc"]
    assert "last.pt, the weight average (epoch 1, step 3)" in out
    assert f"test accuracy: {logged:.2%} (the trainer logged {logged:.2%} for this checkpoint)" in out


def test_a_missing_run_is_one_line_and_exit_2(tmp_path, capsys):
    assert run_main(evaluate_script.main, [str(tmp_path / "missing")]) == 2  # what `python evaluate.py` exits with
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "is not a folder; pass a run folder that train.py wrote" in err


@pytest.mark.parametrize("what, message", [  # the same one line (in-process here: the exit is tested above)
    ("empty", "no checkpoint at"),
    ("foreign", "not a readable torch.save file"),
])
def test_a_folder_without_a_checkpoint_is_refused(tmp_path, what, message):
    (tmp_path / what).mkdir()
    if what == "foreign":
        (tmp_path / what / "best.pt").write_text("not a checkpoint")
    with pytest.raises(UserError, match=message):
        evaluate_script.main([str(tmp_path / what)])
