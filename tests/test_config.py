"""engine/config.py: the recipes, how a Config is resolved and checked, what a resume may change."""
import dataclasses

import pytest

from engine.config import AUGMENT_FIELDS, RECIPES, Config, UserError, augment, check, flag_parser, resolve, resumed
from net import cpu
from pipelines import Augment


def checked(**fields):
    return check(resolve(Config(**fields)))


def test_every_field_is_a_flag_and_only_typed_flags_are_parsed():
    help_ = flag_parser().format_help()  # what `python train.py --help` prints
    for name in Config.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in help_
    assert vars(flag_parser().parse_args(["--lr", "0.1", "--no-compile", "--tta"])) == {"lr": 0.1, "compile": False,
                                                                                         "tta": True}


def test_flag_syntax_errors_keep_argparse_usage(capsys):
    with pytest.raises(SystemExit) as e:
        flag_parser().parse_args(["--recipe", "turbo"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "usage: train.py" in err and "invalid choice: 'turbo'" in err


def test_seed_recipe_is_the_original_design():
    cfg = resolve(Config(recipe="seed", device="cpu"))
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.batch_size, cfg.epochs) == ("adam", 1e-3, 1e-4, 128, 63)


def test_resolve_fills_device_compile_and_log_every():
    cfg = resolve(Config(device="cpu"))
    assert (cfg.device, cfg.compile, cfg.log_every) == ("cpu", False, 1)
    assert cfg.name.endswith("-fast") and cfg.epochs == 15


def test_flags_set_what_they_name_and_the_recipe_fills_the_rest():
    cfg = resolve(Config(recipe="fast", lr=0.05, smoke=True))
    assert cfg.lr == 0.05 and cfg.optimizer == RECIPES["fast"]["optimizer"] and cfg.batch_size == 16  # smoke's


def test_augmentation_defaults_are_the_recipe_and_flags_change_them():
    assert augment(resolve(Config(device="cpu"))) == Augment()  # the numbers live in Augment only
    assert set(AUGMENT_FIELDS) == {f.name for f in dataclasses.fields(Augment)}
    aug = augment(resolve(Config(device="cpu", cutout_p=0.0, rotate=5.0)))
    assert aug.cutout_p == 0.0 and aug.rotate == 5.0 and aug.flip_p == Augment().flip_p
    assert aug.describe() == "flip p=0.5, shift-scale-rotate p=0.5 (shift 2 px, scale 1\u00b10.1, rotate \u00b15\u00b0)"


@pytest.mark.parametrize("fields, message", [
    (dict(batch_size=0), "--batch-size must be at least 1, not 0"),
    (dict(epochs=-3), "--epochs must be at least 1"),
    (dict(lr=-1.0), "--lr must be positive"),
    (dict(dropout=1.0), "--dropout and --label-smoothing must be in [0, 1)"),
    (dict(target_acc=85.0), "--target-acc is a fraction in (0, 1]"),
    (dict(limit_train=8),
     "--limit-train 8 is fewer images than one batch of 16; raise --limit-train or lower --batch-size"),
    (dict(cutout_p=1.5), "--cutout-p 1.5 is outside [0, 1]"),
    (dict(val=-5), "--val is a number of images, at least 0, not -5"),
    (dict(cutout_size=40), "--cutout-size 40 is outside [0, 32]"),
    (dict(smoke=False, data="/no/such/folder"), "--data /no/such/folder does not exist; run `make data`"),
])
def test_each_mistake_is_one_line_naming_the_flag(fields, message, tmp_path):
    with pytest.raises(UserError) as e:
        checked(**{"smoke": True, "runs": str(tmp_path), **fields})
    assert message in str(e.value) and "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []  # nothing created


def test_conv_impl_triton_and_fuse_on_where_the_kernels_cannot_run_are_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # a CPU outside Triton's interpreter
    with pytest.raises(UserError) as e:
        checked(smoke=True, runs=str(tmp_path), conv_impl="triton")
    assert str(e.value).startswith("--conv-impl triton: ") and "use --conv-impl auto or torch" in str(e.value)
    assert checked(smoke=True, runs=str(tmp_path), conv_impl="auto").conv_impl == "auto"  # auto falls back instead
    assert checked(smoke=True, runs=str(tmp_path), fuse="on").fuse == "on"  # on a CPU: the C++ kernels (net/cpu.py)
    monkeypatch.setattr(cpu, "available", lambda: "the C++ kernels did not build (CalledProcessError: g++ failed)")
    with pytest.raises(UserError) as e:
        checked(smoke=True, runs=str(tmp_path), fuse="on")
    assert str(e.value).startswith("--fuse on: the C++ kernels did not build (CalledProcessError: g++ failed); ")
    assert "use --fuse off" in str(e.value) and "\n" not in str(e.value)


def test_an_existing_run_is_not_overwritten(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "last.pt").write_bytes(b"a run")
    with pytest.raises(UserError, match="already holds a run; continue it with --resume"):
        checked(smoke=True, runs=str(tmp_path), name="old")


@pytest.mark.parametrize("runs", ["file/runs", "/proc/x"])  # a file in the way; a folder even root cannot write
def test_an_unwritable_run_folder_is_said_before_anything_starts(runs, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="cannot write the run folder"):
        checked(smoke=True, runs=str(tmp_path / runs))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # the probe is gone


# --- resuming ---------------------------------------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    """The settings a run folder's checkpoint holds, as train.py saves them."""
    return dataclasses.asdict(resolve(Config(smoke=True, epochs=3, runs=str(tmp_path), name="r"))), tmp_path / "r"


def test_a_resume_keeps_the_saved_settings_and_takes_the_longer_run(saved):
    config, run_dir = saved
    cfg, notes = resumed(config, {"epochs": 5, "threads": 1, "conv_impl": "torch"}, run_dir)
    assert (cfg.epochs, cfg.threads, cfg.conv_impl, cfg.lr, cfg.resume) == (5, 1, "torch", config["lr"], str(run_dir))
    assert notes[:3] == ["--epochs 5 (was 3)", "--threads 1 (was None)", "--conv-impl torch (was auto)"]
    assert "stretched" in notes[3]


@pytest.mark.parametrize("given, message", [
    ({"lr": 0.5}, "--lr 0.5 (the run has 0.2): a resumed run keeps its settings but --epochs, --max-steps"),
    ({"lr": 0.5, "dropout": 0.3}, "--lr 0.5 (the run has 0.2), --dropout 0.3 (the run has 0.05): "),
    ({"cutout_p": 0.0}, "--cutout-p 0.0 (the run has 0.5)"),
    ({"epochs": 2}, "--epochs 2 would shorten the run (it has 3); on resume it can only be raised"),
])
def test_a_resume_refuses_flags_it_cannot_honour(saved, given, message):
    with pytest.raises(UserError) as e:
        resumed(saved[0], given, saved[1])
    assert message in str(e.value) and "\n" not in str(e.value)

