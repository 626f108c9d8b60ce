"""bench/roofline.py, bench/sass.py, bench/roofline_report.py: instructions counted from sm_90a machine code, each
loop's body times its launcher's trips.

The builds run in a process without Triton's interpreter (this one has it: conftest.py), as the build test's do."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import roofline, roofline_report, sass
from net import kernels

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not kernels.HAVE_TRITON, reason="needs Triton (pip install -e '.[test]')")


# --- the counter ------------------------------------------------------------------------------------------------

LISTING = """
        /*0000*/                   S2R R0, SR_TID.X ;
        /*0010*/               @P0 BRA `(.L_x_0) ;
        /*0020*/                   MOV R1, R0 ;
.L_x_1:
        /*0030*/                   FFMA R1, R1, R2, R3 ;
        /*0040*/                   IADD3 R4, R4, 0x1, RZ ;
        /*0050*/              @!P1 BRA `(.L_x_1) ;
        /*0060*/                   BRA `(.L_x_2) ;
.L_x_0:
        /*0070*/                   MOV R1, RZ ;
.L_x_2:
        /*0080*/                   STG.E [R6.64], R1 ;
        /*0090*/              @!P2 EXIT ;
        /*00a0*/                   FADD R1, R1, R1 ;
        /*00b0*/                   EXIT ;
.L_x_3:
        /*00c0*/                   BRA `(.L_x_3);
"""


def test_the_path_takes_each_loop_once_skips_what_a_branch_jumps_over_and_stops_at_exit():
    """The guard of a loop that runs no trip is not taken, the jump past its other path is, a predicated EXIT is
    passed (some lanes go on), the trap after the last EXIT is never reached; the loop's body is its label to its
    branch back."""
    path = sass.program_path(sass.parse_sass(LISTING))
    assert path.loops == [3]  # FFMA, IADD3, the branch back
    # S2R, @P0 BRA, MOV, the body once, BRA past .L_x_0, STG, @!P2 EXIT, FADD, EXIT
    assert path.straight == 3 + 3 + 1 + 4
    assert path.per_program([5]) == path.straight + 3 * 4


def test_a_loop_within_a_loop_is_refused():
    nested = LISTING.replace("        /*0050*/              @!P1 BRA `(.L_x_1) ;",
                             ".L_x_9:\n        /*0048*/ NOP ;\n        /*004c*/ @P3 BRA `(.L_x_9) ;\n"
                             "        /*0050*/              @!P1 BRA `(.L_x_1) ;")
    with pytest.raises(NotImplementedError):
        sass.program_path(sass.parse_sass(nested))


def count_small_kernel():
    """{repeat: (straight, loop bodies, FFMAs in the first body)} of a kernel whose runtime loop applies
    `acc = acc * x + 1` `repeat` times a trip (dependent FMAs, none can merge), built for sm_90a: 64 or more a trip,
    which the compilers leave rolled, and 1, a body so small that they unroll it. Run without TRITON_INTERPRET."""
    import re

    import triton
    import triton.language as tl

    @triton.jit
    def looped(x_ptr, out_ptr, n, REPEAT: tl.constexpr):
        i = tl.arange(0, 128)
        x = tl.load(x_ptr + i)
        acc = tl.zeros([128], dtype=tl.float32)
        for _ in range(0, n):
            for _ in tl.static_range(REPEAT):
                acc = acc * x + 1.0
        tl.store(out_ptr + i, acc)

    out = {}
    for repeat in (1, 64, 65, 67):
        b = sass.build(looped, dict(x_ptr="*fp32", out_ptr="*fp32", n=7, REPEAT=repeat), 4)
        path = sass.program_path(b.sass)
        at = {name: i for i, (kind, name) in enumerate(b.sass) if kind == "label"}
        back = [(at[re.search(r"\((\.L_x_\d+)\)", t)[1]], i) for i, (k, t) in enumerate(b.sass)
                if k == "op" and "BRA" in t and at[re.search(r"\((\.L_x_\d+)\)", t)[1]] < i]
        start, end = back[0]
        ffma = sum(1 for k, t in b.sass[start:end + 1] if k == "op" and t.split()[0].startswith("FFMA"))
        out[repeat] = (path.straight, path.loops, ffma)
    return out


def run_built(function):
    """`function` (module:name, returning JSON) in a process that builds for the GPU (no TRITON_INTERPRET)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    module, name = function.split(":")
    r = subprocess.run([sys.executable, "-c", f"import json; from {module} import {name}; print(json.dumps({name}()))"],
                       capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.splitlines()[-1])


def test_the_count_grows_by_the_loops_body_per_trip_on_a_real_build():
    """A real sm_90a build of a known loop: one loop, whose body holds the trip's FMAs and grows by one instruction
    for each FMA more, while the instructions outside it stay put: the body is what runs once per trip. A body small
    enough to be unrolled comes out as two loops (the unrolled one and its remainder), which the count would take for
    two loops of one trip each: `kernel_row` refuses a kernel whose loops are not the LOOP_TRIPS it declares."""
    counts = {int(k): v for k, v in run_built("tests.test_roofline:count_small_kernel").items()}
    for repeat in (64, 65, 67):
        straight, loops, ffma = counts[repeat]
        assert len(loops) == 1 and ffma == repeat, (repeat, loops, ffma)
    assert counts[65][1][0] - counts[64][1][0] == 1 and counts[67][1][0] - counts[64][1][0] == 3
    outside = {repeat: straight - loops[0] for repeat, (straight, loops, _) in counts.items() if repeat > 1}
    assert outside[64] == outside[65] == outside[67]  # the path holds the body once; the rest does not move
    assert len(counts[1][1]) > 1


# --- the launchers' trips -----------------------------------------------------------------------------------------

# What each kernel's loop walks over the whole launch, and its step: (elements, step) from its arguments and grid.
WALKS = {"_dwconv_backward_kernel": lambda a, g: (a["H"] * a["W"] * g[0] * g[2], a["BLOCK_P"]),
         "_dw_forward": lambda a, g: (a["POSITIONS"] * g[0] * g[2], a["BLOCK_P"]),
         "_dw_backward": lambda a, g: (a["POSITIONS"] * g[0] * g[2], a["BLOCK_P"]),
         "_pw_forward": lambda a, g: (a["C_in"] * g[0] * g[1], a["BLOCK_K"]),
         "_pw_dgrad": lambda a, g: (a["C_out"] * g[0] * g[1], a["BLOCK_K"]),
         "_pw_wgrad": lambda a, g: (a["P"] * g[0] * g[1], a["BLOCK_K"]),
         "_pool_forward": lambda a, g: (a["HW"] * g[0] * g[1], a["BLOCK_P"]),
         "_pool_backward": lambda a, g: (a["HW"] * g[0] * g[1], a["BLOCK_P"])}


@pytest.mark.parametrize("batch, size", [(512, 32), (3, 7)])
def test_each_launchers_trips_cover_the_elements_its_loop_walks_once(monkeypatch, batch, size):
    """At the step's shapes and at odd ones: every kernel with a runtime loop has LOOP_TRIPS, whose trips times the
    loop's step cover what the loop walks, with less than one step to spare per program (a tile's last trip may be
    partial, no more)."""
    monkeypatch.setattr(kernels, "interpreting", lambda: False)  # the CUDA launchers' grids and tiles
    from net import fused

    monkeypatch.setattr(fused, "interpreting", lambda: False)
    seen = set()
    for variant in roofline.VARIANTS:
        for layer, direction, launch in roofline.step_launches(variant, batch=batch, size=size):
            for tile in launch.tiles:
                named = launch.named({k: v for k, v in tile.items() if k != "num_warps"})
                grid = tuple(launch.grid(tile)) + (1,) * 2
                trips = roofline.loop_trips(launch, named, grid[:3])
                if launch.name not in WALKS:
                    assert trips == [], launch.name
                    continue
                seen.add(launch.name)
                elements, step = WALKS[launch.name](named, grid)
                programs = math.prod(grid[:3])
                assert elements <= trips[0] * step < elements + programs * step, (layer, launch.name, tile)
    assert seen == set(WALKS)


# --- the report ---------------------------------------------------------------------------------------------------

def row(layer, kernel, tile, instructions, nbytes, flops=0.0):
    r = {"layer": layer, "direction": "forward", "kernel": kernel, "tile": tile, "registers": 64, "stack": 0,
         "warp_instructions": instructions, "bytes": nbytes, "workspace_bytes": 0.0, "tensor_flops": flops}
    r["times"] = roofline.times(r)
    return r


def test_a_variant_runs_each_launchs_fastest_tile_and_its_rate_adds_every_bound_and_the_rest_of_the_step():
    issue, memory = roofline.GPUS["H100"]["issue"], roofline.GPUS["H100"]["memory"]
    rows = [row("A", "k", "slow", 2e6, 1e5), row("A", "k", "fast", 1e6, 1e5),  # issue-bound either way
            row("B", "k", "only", 1e3, 1e7)]  # memory-bound
    assert {r["tile"] for r in roofline.picked(rows)} == {"fast", "only"}
    assert rows[2]["times"]["H100"]["bound"] == "memory" and rows[1]["times"]["H100"]["bound"] == "issue"
    s = roofline.summary(rows, {"bytes_per_image": 5e6, "project_ops": {"bytes_per_image": 1e6}})
    assert s["rest_bytes"] == 4e6 and s["warp_instructions"] == 1e6 + 1e3
    want = 1 / (1e6 / issue + 1e7 / memory + 4e6 / memory)
    assert math.isclose(s["predicted"]["H100"]["img_per_s"], want, rel_tol=1e-12)
    assert roofline.summary(rows, None)["predicted"]["H100"]["img_per_s"] is None  # no traffic: no rate


def test_bad_use_is_one_line(monkeypatch, capsys):
    with pytest.raises(SystemExit) as e:
        roofline_report.main(["--batch-size", "0"])
    assert e.value.code == 2 and "--batch-size must be at least 1" in capsys.readouterr().err
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert roofline_report.main(["--traffic-from", "nowhere.json"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "TRITON_INTERPRET=1 is set" in err


def test_the_committed_counts_meet_the_instruction_budget():
    """The newest committed roofline (bench/results/*-roofline-after.json, `python -m bench.roofline`): the fused
    step at most 16M warp-instructions per training image at batch 512, bf16, dropout 0.05; dropout at most 35% over
    dropout 0 on the same tiles; the unfused Triton convs at most 6M; no tile the step runs spills."""
    results = sorted((ROOT / "bench" / "results").glob("*-roofline-after.json"))
    assert results, "no committed roofline"
    data = json.loads(results[-1].read_text())
    assert data["batch"] == 512 and data["dropout"] == 0.05
    v = {key: variant["summary"] for key, variant in data["variants"].items()}
    assert v["fused"]["warp_instructions"] <= 16e6
    assert v["fused"]["warp_instructions"] <= 1.35 * v["fused, dropout 0"]["warp_instructions"]
    assert v["triton convs"]["warp_instructions"] <= 6e6
    for variant in data["variants"].values():
        assert all(r["stack"] == 0 for r in roofline.picked(variant["rows"]))


def keep_bits_builds():
    """{channels: distinct builds} of the keep-bit kernels a fused step launches (layers 0 and 1 among them, which an
    int argument would specialise on), at their first tile. Run without TRITON_INTERPRET."""
    out = {}
    for layer, direction, launch in roofline.step_launches("fused"):
        if launch.name == "_keep_bits":
            out.setdefault(launch.named({})["C"], set()).add(sass.build_request(launch, launch.tiles[0]))
    return {c: len(builds) for c, builds in out.items()}


def test_a_kernel_builds_once_for_every_layer_of_a_shape():
    """Dropout's keep bits take the layer's index as an int and the seeds whole (a slice of them alternated between
    16-byte aligned and not, and built twice): three layers of each width, one build each width."""
    assert run_built("tests.test_roofline:keep_bits_builds") == {"32": 1, "64": 1, "128": 1, "256": 1}


def test_the_picture_puts_each_kernel_against_the_ceilings(tmp_path):
    """docs/roofline.png's maker, on two made-up kernels: a PNG, whatever the variants."""
    pytest.importorskip("matplotlib")
    rows = [row("A", "k", "t", 1e6, 1e5), row("B", "k", "t", 1e3, 1e7)]
    results = {"variants": {"fused": {"rows": rows}, "triton convs": {"rows": rows[:1]}}, "triton": "3.9.0",
               "batch": 512, "dropout": 0.05, "date": "2026-12-07"}
    roofline_report.picture(results, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
