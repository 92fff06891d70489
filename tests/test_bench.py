"""``python -m fer_sweep.bench`` as a user runs it: complete, self-consistent records, and a clear
error before any measuring when the input is wrong. No timing is asserted (the machine is shared
and noisy): only that every number is there, positive, and that the table and ratios are
computed from the samples the JSON holds.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from itertools import product
from pathlib import Path

import pytest
import torch

from fer_sweep.core.device import resolve_precision
from tests.conftest import real_data, run_cli

# every test here starts the CLI or trains; one worker, so the module's benchmark runs once
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("bench")]

MODELS, TRANSFORMS, PIPELINES = ("cnn2", "cnn3"), ("norm", "aug"), ("ceiling", "fer_sweep", "naive")
REPEATS, STEPS = 2, 2


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    tmp = tmp_path_factory.mktemp("bench")
    args = [
        "--models",
        ",".join(MODELS),
        "--transforms",
        ",".join(TRANSFORMS),
        "--steps",
        str(STEPS),
        "--repeats",
        str(REPEATS),
        "--warmup",
        "1",
        "--no-compile",  # compiling costs ~40 s per model and precision
        "--json",
        str(tmp / "b.json"),
    ]
    if not real_data():
        args.append("--synthetic")
    proc = run_cli(args, cwd=tmp, module="fer_sweep.bench", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp / "b.json").read_text()), proc.stdout


def test_records_cover_every_model_transforms_and_pipeline(bench) -> None:
    result, _ = bench
    records = {(r["model"], r["transforms"], r["pipeline"]): r for r in result["records"]}
    assert set(records) == set(product(MODELS, TRANSFORMS, PIPELINES))
    for key, r in records.items():
        assert len(r["samples"]) == REPEATS, key
        assert all(v > 0 for v in r["samples"]), key
        assert r["images_per_second"] == pytest.approx(statistics.median(r["samples"]), abs=0.1)
        assert (r["steps"], r["batch_size"]) == (STEPS, 100)
    for m in MODELS:  # each transforms has its own ceiling (on its fer_sweep pipeline's model)
        norm, aug = records[(m, "norm", "ceiling")], records[(m, "aug", "ceiling")]
        assert norm["samples"] != aug["samples"]


def test_ratios_are_medians_of_paired_repeats(bench) -> None:
    result, _ = bench
    s = {(r["model"], r["transforms"], r["pipeline"]): r["samples"] for r in result["records"]}
    assert {(r["model"], r["transforms"]) for r in result["ratios"]} == set(
        product(MODELS, TRANSFORMS)
    )
    for r in result["ratios"]:
        m, t = r["model"], r["transforms"]
        for key, other in (
            ("fer_sweep_over_ceiling", "ceiling"),
            ("fer_sweep_over_naive", "naive"),
        ):
            paired = [a / b for a, b in zip(s[(m, t, "fer_sweep")], s[(m, t, other)], strict=True)]
            exact = pytest.approx(statistics.median(paired), rel=2e-3, abs=6e-4)  # 3 decimals
            assert r[key] == exact, (m, t, key)


def test_ceiling_variants_and_the_best_of_them(bench) -> None:
    """Every precision the device offers, eager (compile left out here); fer_sweep is compared
    with the fastest and with fp32 eager through its own variant, per repeat: (fer_sweep /
    paired ceiling) x (own variant / that variant), the median and the range of those."""
    result, _ = bench
    s = {(r["model"], r["transforms"], r["pipeline"]): r["samples"] for r in result["records"]}
    variants = {(c["model"], c["variant"]): c for c in result["ceilings"]}
    amp = resolve_precision("auto", torch.device("cpu"))
    precisions = {"fp32", resolve_precision("bf16", torch.device("cpu"))}
    assert set(variants) == {(m, f"{p}_eager") for m in MODELS for p in precisions}
    for c in result["ceilings"]:
        assert len(c["samples"]) == REPEATS and c["compile"] is False
        assert c["images_per_second"] == pytest.approx(statistics.median(c["samples"]), abs=0.1)
    for r in result["ratios"]:
        m, t = r["model"], r["transforms"]
        best = max(
            (c for c in result["ceilings"] if c["model"] == m),
            key=lambda c: statistics.median(c["samples"]),
        )
        assert r["best_ceiling"] == best["variant"]
        assert (r["fer_sweep_precision"], r["fer_sweep_variant"]) == (amp, f"{amp}_eager")
        own = variants[(m, f"{amp}_eager")]["samples"]
        for key, target in (
            ("fer_sweep_over_best_ceiling", best["samples"]),
            ("fer_sweep_over_fp32_eager", variants[(m, "fp32_eager")]["samples"]),
        ):
            chained = [
                o / c * v / x
                for o, c, v, x in zip(
                    s[(m, t, "fer_sweep")], s[(m, t, "ceiling")], own, target, strict=True
                )
            ]
            # JSON keeps 3 decimals: a ratio of 0.073 is within 5e-4 of its exact value
            exact = pytest.approx(statistics.median(chained), rel=2e-3, abs=6e-4)
            assert r[key] == exact, (m, t, key)
            lo, hi = r[f"{key}_range"]
            assert lo == pytest.approx(min(chained), rel=2e-3, abs=6e-4)
            assert hi == pytest.approx(max(chained), rel=2e-3, abs=6e-4)


def test_load_times_and_markdown_table(bench) -> None:
    result, stdout = bench
    load = result["load"]
    assert load["images"] == 35_887 if real_data() else load["images"] > 0
    assert load["cold_seconds"] > 0 and load["warm_seconds"] > 0 and load["dataset_seconds"] > 0
    assert result["synthetic"] is (not real_data())
    table = stdout.split("Ceiling variants")[0]
    rows = [line for line in table.splitlines() if line.startswith("| cnn")]
    assert len(rows) == len(MODELS) * len(TRANSFORMS)
    for r, line in zip(result["ratios"], rows, strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[:3] == [r["model"], r["transforms"], r["fer_sweep_precision"]]
        lo_best, hi_best = r["fer_sweep_over_best_ceiling_range"]
        lo_fp32, hi_fp32 = r["fer_sweep_over_fp32_eager_range"]
        assert cells[7:] == [
            f"{r['fer_sweep_over_ceiling']:.2f}",
            f"{r['fer_sweep_over_best_ceiling']:.2f} ({lo_best:.2f}-{hi_best:.2f})",
            f"{r['fer_sweep_over_fp32_eager']:.2f} ({lo_fp32:.2f}-{hi_fp32:.2f})",
            f"{r['fer_sweep_over_naive']:.2f}",
        ]
    assert f"Data loading ({load['images']:,} images)" in stdout


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_malloc_tuning_is_on_by_default_recorded_and_can_be_turned_off(bench) -> None:
    result, stdout = bench
    assert result["malloc_tuned"] is True and "tuned glibc malloc" in stdout
    probe = "from fer_sweep.core import runtime; print(runtime.tune()['malloc'] == 'tuned')"
    for value, expected in (("0", "False"), ("1", "True")):
        proc = subprocess.run(
            [sys.executable, "-c", probe],
            capture_output=True,
            text=True,
            env={**os.environ, "FER_SWEEP_MALLOPT": value},
            check=True,
        )
        assert proc.stdout.strip() == expected, value


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        ([], {"FER2013_ROOT": ""}, "FER2013_ROOT is not set"),
        ([], {"FER2013_ROOT": "/nonexistent/fer"}, "has no train/ and test/ image folders"),
        (["--models", "cnn2,vgg"], {}, "--models 'cnn2,vgg': give a comma-separated list of"),
        (["--steps", "0"], {}, "--steps=0 must be a positive integer"),
        (["--synthetic", "--override", "trainer.batch_size=0"], {}, "trainer.batch_size"),
    ],
)
def test_bad_input_is_one_clear_error(
    tmp_path: Path, args: list[str], env: dict[str, str], message: str
) -> None:
    proc = run_cli(
        [*args, "--json", str(tmp_path / "b.json")],
        cwd=tmp_path,
        module="fer_sweep.bench",
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "b.json").exists()


def test_chained_ratios_and_the_direct_fallback() -> None:
    """Per repeat: fer_sweep / paired ceiling x own variant / target; with no own variant
    measured (a compiled fer_sweep under --no-compile), fer_sweep / target directly."""
    from fer_sweep.tools.bench.measure import _chained_ratios, _range

    ours, ceiling, own, target = [90.0, 80.0], [100.0, 100.0], [120.0, 90.0], [60.0, 30.0]
    assert _chained_ratios(ours, ceiling, own, target) == pytest.approx([1.8, 2.4])
    assert _chained_ratios(ours, ceiling, None, target) == pytest.approx([1.5, 80 / 30])
    assert _range([1.8, 2.4, 2.0]) == [1.8, 2.4]
