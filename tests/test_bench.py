"""The bench on CPU: every row measured and written, a failure keeping what it measured, its helpers,
and the conv-by-conv breakdown (`python -m bench.convs`)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import bench, convs
from bench import model as bench_model
from bench.pipelines import torch_augment
from bench.report import figure
from bench.timing import measure
from engine.device import CompileCheck
from pipelines import MEAN, STD, Augment

ROOT = Path(__file__).resolve().parents[1]


def numbers(d):
    for v in d.values():
        if isinstance(v, dict):
            yield from numbers(v)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            yield v


def rejecting_compile_check(model, env, **kwargs):
    return CompileCheck(model, compiled=False, note="the compiled model disagrees with eager; training eager")


@pytest.mark.long
def test_quick_cpu_bench_writes_every_figure(tmp_path, monkeypatch, capsys):
    # One more variant, compiled: its compile check rejects it, and the bench goes on with it eager.
    variants = {**bench.model_variants("cpu"),
                "compiled fp32 channels_last": bench_model.Variant(torch.float32, True, True)}
    for module in (bench, bench_model):  # the variants the bench lists, and those its model rows measure
        monkeypatch.setattr(module, "model_variants", lambda device: variants)
    monkeypatch.setattr(bench_model, "compile_checked", rejecting_compile_check)
    # The traffic count compiles the whole model (half a minute a variant here; tests/test_traffic.py counts a small
    # one): its rows as bench.traffic hands them over.
    counted = []

    def traffic_rows(device, batch):
        counted.append((device, batch))
        yield "torch convs", {"kernels": 166, "bytes_per_image": 64.9e6, "floor_bytes_per_image": 11.8e6,
                              "ratio_to_floor": 5.5, "batch": batch, "counted_by": "Inductor for cpu",
                              "top": [{"kernel": "native_batch_norm_backward + relu", "bytes_per_image": 2.36e6}]}

    monkeypatch.setattr(bench, "traffic_rows", traffic_rows)
    # The roofline builds every kernel for sm_90a (two minutes here; tests/test_roofline.py tests it): its summary
    # as bench.roofline hands it over, counted on the bench's own traffic rows.
    given = []

    def roofline_rows(traffic):
        given.append(traffic)
        return {"fused": {"warp_instructions": 14.0e6, "kernels": 40, "triton": "3.9.0", "predicted": {
            gpu: {"img_per_s": 63e3, "issue_bound_img_per_s": 66e3} for gpu in ("H100", "H200")}}}

    monkeypatch.setattr(bench, "roofline_rows", roofline_rows)
    code = bench.main(["--quick", "--device", "cpu", "--batch-size", "4", "--data", str(tmp_path / "none"),
                       "--out", str(tmp_path / "results"), "--tensorboard", str(tmp_path / "tb")])
    assert code == 0
    [result] = (tmp_path / "results").glob("*-cpu-quick.json")
    res = json.loads(result.read_text())
    report = (tmp_path / "results" / result.name.replace(".json", ".md")).read_text()
    assert res["complete"] and {"DALI raw, cpu", "DALI raw, no augmentation, cpu", "DALI encoded (decode), cpu",
                                "plain torch, cpu"} <= set(res["pipeline"])
    assert {"train, eager fp32 NCHW", "train, eager fp32 channels_last", "train, compiled fp32 channels_last",
            "inference, compiled fp32 channels_last"} <= set(res["model"])
    assert res["compile"]["compiled fp32 channels_last"]["compiled"] is False and "disagrees" in report
    assert res["end_to_end"]["model"] == "compiled fp32 channels_last"
    assert set(res["end_to_end_others"]) == set(variants) - {"compiled fp32 channels_last"}  # each CPU row end to end
    assert res["limit"]["bf16_matmul_tflops"] > 0 and "bf16 matmul here" in report
    assert 0 < res["costs"]["augment draws"]["ms"] < 50 and res["costs"]["epoch start, DALI raw, cpu"]["reset_ms"] > 0
    host = res["costs"]["augmentation host cost, cpu"]
    assert list(host["batches"]) == ["512", "1024", "2048"] and len(host["growth_per_doubling"]) == 2
    assert all(r["augmented_ms"] > 0 and r["plain_ms"] > 0 for r in host["batches"].values())
    assert "augmentation host cost, cpu: " in report and "per doubling of the batch" in report
    for section in ("pipeline", "model", "end_to_end", "limit", "costs"):
        # a difference: any sign
        values = list(numbers({k: v for k, v in res[section].items() if "host cost" not in k}))
        assert values and all(v > 0 for v in values), section
    best_model = max(v["img_per_s"] for k, v in res["model"].items() if k.startswith("train"))
    assert res["end_to_end"]["img_per_s"] <= 1.3 * best_model  # the pipeline cannot make training faster
    assert res["limit"]["floor_img_per_s"] > res["end_to_end"]["img_per_s"]
    assert "| end to end |" in capsys.readouterr().out and "synthetic" in res["data"]
    assert list((tmp_path / "tb").iterdir())  # TensorBoard scalars
    assert "| 0 " not in report.split("\n\n")[0]  # the rates' table: small rates keep their digits
    layers = res["layers"]  # the fused step a layer at a time: 12 convs with what is fused to them, then the rest
    assert [r["layer"] for r in layers[:3]] == ["C1 3x3 d1, 3->32", "C1 depthwise 3x3 d2, 32", "C1 1x1, 32->32"]
    assert len(layers) == 13 and layers[-1]["layer"] == "the rest" and layers[9]["runs"] == "C++ kernel"
    assert all(r["forward_ms"] > 0 and r["total_ms"] > r["forward_ms"] and r["floor_ms"] > 0 for r in layers[:12])
    assert "| C4 1x1, 256->256 " in report and "| all " in report
    assert counted == [("cpu", 2)] and res["traffic"]["torch convs"]["kernels"] == 166  # --quick: a smaller batch
    assert given == [res["traffic"]] and res["roofline"]["fused"]["warp_instructions"] == 14.0e6
    assert ("  - fused: 14.0M warp-instructions per training image in 40 Triton kernels (issue bound 66,000 img/s on "
            "an H100); predicted step H100 63,000, H200 63,000 img/s") in report
    assert ("  - torch convs: 166 kernels, 64.9 MB per training image, 5.5x the floor model's 11.8 MB (compiled bf16 "
            "channels_last step at batch 2, counted by Inductor for cpu: an estimate, not a timing); largest kernel "
            "2.36 MB: native_batch_norm_backward + relu") in report


def test_a_bench_that_fails_keeps_the_rows_it_measured(tmp_path, monkeypatch):
    calls = []

    def dali_then_failure(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("the machine went away")
        return {"img_per_s": 1234.0, "min": 1000.0, "max": 1500.0, "repeats": 5, "batch": 256}

    monkeypatch.setattr(bench, "bench_dali", dali_then_failure)
    with pytest.raises(RuntimeError, match="went away"):
        bench.main(["--quick", "--device", "cpu", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "results")])
    [result] = (tmp_path / "results").glob("*.json")
    res = json.loads(result.read_text())
    assert not res["complete"] and list(res["pipeline"]) == ["DALI raw, cpu"] and "augment draws" in res["costs"]
    assert "**incomplete**" in result.with_suffix(".md").read_text()


def test_figures_keep_the_digits_they_need():
    assert [figure(v) for v in (0.5, 12.34, 99.96, 1234.5)] == ["0.5", "12.3", "100", "1,234"]


def test_data_smaller_than_a_batch_is_one_line(image_tree, tmp_path, capsys):
    out = str(tmp_path / "results")
    assert bench.main(["--quick", "--device", "cpu", "--data", str(image_tree), "--out", out]) == 2  # its exit status
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "fewer than the 256 of one batch" in err
    assert not (tmp_path / "results").exists()


def test_measure_reports_median_and_spread():
    calls = []
    r = measure(lambda: calls.append(1), images_per_step=10, steps=3, repeats=5, warmup=2, sync=lambda: None)
    assert len(calls) == 2 + 3 * 5
    assert r["min"] <= r["img_per_s"] <= r["max"] and r["repeats"] == 5


def test_plain_torch_augmenter_matches_the_recipe():
    """The GPU comparison augmenter, checked on CPU: same normalization, flip and cutout."""
    x = torch.randint(0, 256, (64, 32, 32, 3), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(0)
    ref = (x.permute(0, 3, 1, 2).float() - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    none = torch_augment(x, Augment(flip_p=0, ssr_p=0, cutout_p=0), gen).float()
    torch.testing.assert_close(none, ref, atol=0.02, rtol=0.01)  # bf16 output
    flipped = torch_augment(x, Augment(flip_p=1, ssr_p=0, cutout_p=0), gen).float()
    torch.testing.assert_close(flipped, ref.flip(3), atol=0.02, rtol=0.01)
    cut = torch_augment(x, Augment(flip_p=0, ssr_p=0, cutout_p=1), gen).float()
    holes = (cut == 0).all(1).sum(dim=(1, 2)).numpy()
    assert holes.max() == 256 and np.all(holes > 0)  # 16x16 at most, clipped at the borders


@pytest.mark.cuda
def test_quick_cuda_bench_exits_0(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bench", "--quick", "--device", "cuda", "--data", str(tmp_path / "none"),
                        "--out", str(tmp_path / "results"), "--tensorboard", str(tmp_path / "tb")],
                       capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    [result] = (tmp_path / "results").glob("*-cuda-quick.json")
    res = json.loads(result.read_text())
    assert res["complete"] and {"DALI raw, cuda", "plain torch, cuda"} <= set(res["pipeline"])
    assert res["compile"]["compiled bf16 channels_last"]["graphs"] == 2
    assert res["compile"]["compiled bf16 channels_last, auto convs"]["graphs"] == 2  # the kernels' ops: no graph break


def test_convs_times_every_conv_in_each_implementation_beside_its_memory_time_and_names_the_top_kernels():
    timing = dict(steps=1, repeats=1, warmup=0, sync=lambda: None)
    rows = convs.conv_rows(torch.device("cpu"), torch.float32, 1, timing, bandwidth=1e10)
    assert len(rows) == 12 and rows[1]["conv"] == "1: 32->32, k3, dilation 2, groups 32"  # the first depthwise conv
    for r in rows:  # torch in both layouts; the Triton kernels only on CUDA
        assert set(r) == {"conv", "torch channels_last", "torch NCHW", "memory_ms"}
        assert all(0 < ms for impl in ("torch channels_last", "torch NCHW") for ms in r[impl])
    x_bytes = 32 * 32 * 32 * 4  # C1's depthwise conv, one fp32 image: x and y the same size
    assert rows[1]["memory_ms"] == pytest.approx((2 * x_bytes / 1e10 * 1e3, 5 * x_bytes / 1e10 * 1e3))
    table = convs.conv_table(rows, 1)
    assert table.splitlines()[0] == "| conv | torch channels_last ms | torch NCHW ms | memory time ms |"
    assert "%)" in table.splitlines()[3]  # each time with the share the memory traffic needs
    cfg = bench.resolve(bench.Config(device="cpu", batch_size=2))
    assert "aten::convolution_backward" in convs.top_kernels(cfg, bench.setup_env(cfg), steps=1)
