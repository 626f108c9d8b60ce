"""`python -m bench.gpu_check` where there is no GPU: its one-line refusal, and a CUDA test run
cut short by its timeout, which the report still describes (the check goes on without it)."""
import pytest
import torch

from bench import gpu_check


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_without_cuda_it_says_so_in_one_line_and_exits_2(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs a CUDA device" in err
    assert not (tmp_path / "report").exists()  # nothing half-written


def test_cuda_tests_cut_short_are_a_timeout_with_their_log_kept(tmp_path):
    lines, data = gpu_check.cuda_tests(tmp_path, "no-data", timeout=0.1)  # pytest cannot even start in 0.1 s
    assert data["timed_out"] and not data["ok"]
    assert lines[0].startswith("- TIMEOUT after 0.1 s")
    assert (tmp_path / "cuda-tests.log").exists()


def test_an_unknown_section_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--sections", "kernels,warp-drive"])
    assert e.value.code == 2 and "--sections takes some of kernels, fused, convs, steps" in capsys.readouterr().err


@pytest.mark.cuda
def test_on_cuda_the_kernels_section_checks_every_layer_and_passes():
    lines, data = gpu_check.kernels(batch=16)
    assert data["ok"] and len(data["rows"]) == 7 * 2 * 2 and lines[0].startswith("- PASS")
