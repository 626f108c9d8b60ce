"""`python -m bench.gpu_check` where there is no GPU: its one-line refusal, and a CUDA test run
cut short by its timeout, which the report still describes (the check goes on without it)."""
import pytest
import torch

from bench import gpu_check, gpu_check_sections


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_without_cuda_it_says_so_in_one_line_and_exits_2(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs a CUDA device" in err
    assert not (tmp_path / "report").exists()  # nothing half-written


def test_cuda_tests_cut_short_are_a_timeout_with_their_log_kept(tmp_path):
    lines, data = gpu_check_sections.cuda_tests(tmp_path, "no-data", timeout=0.1)  # pytest cannot even start in 0.1 s
    assert data["timed_out"] and not data["ok"]
    assert lines[0].startswith("- TIMEOUT after 0.1 s")
    assert (tmp_path / "cuda-tests.log").exists()


def test_an_unknown_section_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--sections", "kernels,warp-drive"])
    assert e.value.code == 2
    assert "--sections takes some of fused-tests, kernels, fused, convs" in capsys.readouterr().err


@pytest.mark.cuda
def test_on_cuda_the_kernels_section_checks_every_layer_and_passes():
    lines, data = gpu_check_sections.kernels(batch=16)
    assert data["ok"] and len(data["rows"]) == 7 * 2 * 2 and lines[0].startswith("- PASS")


def test_the_fused_sections_verdict_is_the_fp32_check_and_the_bf16_row_is_for_the_record(monkeypatch):
    """The fused section's fp32 row is check_fused's fp32 precision (autocast and TF32 off: tests/test_convs.py
    shows that it runs fp32 even in a bf16 environment); the bf16 row, the run's precision, decides nothing."""
    from engine import convs
    from engine.config import Config, resolve
    from engine.device import Env

    monkeypatch.setattr(gpu_check_sections, "trainer_setup", lambda: (resolve(Config(device="cpu")),
                                                                      Env(device=torch.device("cpu"))))
    monkeypatch.setattr(convs, "time_steps", lambda model, env, **k: {"fused": 1.0, "unfused": 2.0})
    asked = []

    def check(failing):
        def check_fused(model, env, *, batch, precision):
            asked.append(precision)
            failed = ["dropout 0: output"] if precision == failing else []
            return convs.FusedCheck(errors={"dropout 0: output": (1e-6, 1e-6)}, failed=failed, precision=precision)
        return check_fused

    for failing, ok in (("run", True), ("fp32", False)):
        monkeypatch.setattr(convs, "check_fused", check(failing))
        lines, data = gpu_check_sections.fused(batch=4)
        assert data["ok"] is ok and lines[0].startswith("- PASS" if ok else "- FAIL")
    assert asked == ["fp32", "run"] * 2
