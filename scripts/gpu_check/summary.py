"""$OUT/gpu_check.json and .md from the phase records, env.json, the benchmark JSONs and the
runs in the MLflow store; exit 0 (all good), 1 (a failure) or 2 (the environment stopped it)."""

import json
import os
import statistics
import sys
from pathlib import Path

out, work = Path(os.environ["GPU_CHECK_OUT"]), Path(os.environ["GPU_CHECK_WORK"])
smoke = os.environ["GPU_CHECK_SMOKE"] == "1"
uri, exp_name = os.environ["GPU_CHECK_URI"], os.environ["GPU_CHECK_EXPERIMENT"]
budget, total = int(os.environ["GPU_CHECK_BUDGET_S"]), int(os.environ["GPU_CHECK_TOTAL_S"])
# The study's Table 2 (test accuracy, %); the floor is 5 points below.
STUDY = {
    "row1": ("cnn2", 52.6),
    "row2": ("cnn2_fc1000", 51.3),
    "row3": ("cnn2_fc3", 51.4),
    "row4": ("cnn3", 50.4),
    "row5": ("resnet_small", 60.4),
    "row6": ("resnet", 65.9),
    "row7": ("resnet_dropout", 63.3),
}
MARGIN = 5.0
REQUIRED = ["env", "prepare", "bench", "table2", "compile", "fast", "report"]
OPTIONAL = ["bench_channels_last_off"]  # skipped for lack of budget is not a failure


def load_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


phases = []
for line in (work / "phases.tsv").read_text().splitlines():
    f = (line.split("\t") + [""] * 6)[:6]
    phases.append(
        {
            "name": f[0],
            "status": f[1],
            "seconds": int(f[2] or 0),
            "limit_s": int(f[3]) if f[3].lstrip("-").isdigit() else None,
            "rc": int(f[4]) if f[4].lstrip("-").isdigit() else None,
            "note": f[5],
            "log": f"logs/{f[0]}.log",
        }
    )
seen = {p["name"] for p in phases}
for name in REQUIRED + OPTIONAL:
    if name not in seen:  # the script stopped (interrupted) before it
        phases.append(
            {
                "name": name,
                "status": "not_run",
                "seconds": 0,
                "limit_s": None,
                "rc": None,
                "note": "the script ended before this phase",
                "log": None,
            }
        )
env = load_json(out / "env.json") or {}

# ------------------------------------------------------------------ runs, from MLflow
runs, store_error = [], None
try:
    from mlflow.tracking import MlflowClient

    if (work / "mlflow.db").exists():
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(exp_name)
        found = (
            client.search_runs(
                [exp.experiment_id], "tags.`fer_sweep.role` = 'job'", max_results=1000
            )
            if exp
            else []
        )
        for r in sorted(found, key=lambda r: r.info.start_time):
            t, m, p = r.data.tags, r.data.metrics, r.data.params
            name = r.info.run_name or ""
            bare = name.removeprefix("SYNTHETIC-")  # data=synthetic runs are named so
            row = t.get("fer_sweep.choice.table2") or (
                bare.split("-")[0] if bare.startswith("row") else None
            )
            compiled = str(p.get("trainer.compile")).lower() == "true"
            secs = [
                x.value
                for x in sorted(
                    client.get_metric_history(r.info.run_id, "epoch_seconds"), key=lambda x: x.step
                )
            ]
            acc = m.get("test_acc")
            study = STUDY.get(row, (None, None))[1] if row else None
            floor = round(study - MARGIN, 1) if study is not None else None
            device = t.get("device", "")
            runs.append(
                {
                    "kind": "table2"
                    if row
                    else ("compile" if compiled else "fast" if bare == "fast" else "other"),
                    "row": row,
                    "name": name,
                    "run_id": r.info.run_id,
                    "model": t.get("model"),
                    "transforms": t.get("transforms"),
                    "status": r.info.status,
                    "device": device,
                    "device_name": t.get("device_name"),
                    "precision": t.get("precision"),
                    "compile": p.get("trainer.compile"),
                    "channels_last": p.get("trainer.channels_last"),
                    "stop_reason": t.get("fer_sweep.stop_reason"),
                    "epochs_configured": int(p["trainer.epochs"])
                    if p.get("trainer.epochs")
                    else None,
                    "epochs_run": int(m["stopped_epoch"]) if "stopped_epoch" in m else len(secs),
                    "best_epoch": int(m["best_epoch"]) if "best_epoch" in m else None,
                    "epoch_seconds_mean": round(statistics.mean(secs), 3) if secs else None,
                    "epoch_seconds_mean_after_first": round(statistics.mean(secs[1:]), 3)
                    if len(secs) > 1
                    else None,
                    "first_epoch_seconds": round(secs[0], 3) if secs else None,
                    "train_seconds": round(m["train_seconds"], 1) if "train_seconds" in m else None,
                    "test_acc": acc,
                    "test_acc_pct": round(100 * acc, 2) if acc is not None else None,
                    "study_pct": study,
                    "floor_pct": floor,
                    "pass_floor": None
                    if (floor is None or smoke)
                    else bool(acc is not None and 100 * acc >= floor),
                    "on_cuda": device.startswith("cuda"),
                    "error": t.get("fer_sweep.error"),
                }
            )
except Exception as err:  # noqa: BLE001 - the summary is written regardless
    store_error = f"{type(err).__name__}: {err}"


# ------------------------------------------------------------------ benchmark digest
def bench_digest(path):
    b = load_json(path)
    if not b:
        return None
    fer = {
        (r["model"], r["transforms"]): r["images_per_second"]
        for r in b.get("records", [])
        if r.get("pipeline") == "fer_sweep"
    }
    return {
        "file": Path(path).name,
        "device": b.get("device"),
        "device_name": b.get("device_name"),
        "torch": b.get("torch"),
        "seconds": b.get("bench_seconds"),
        "load": b.get("load"),
        "overrides": b.get("overrides"),
        "ratios": b.get("ratios"),
        "ceilings": {
            f"{c['model']} {c['variant']}": c["images_per_second"] for c in b.get("ceilings", [])
        },
        "fer_sweep_images_per_second": {f"{m} {t}": v for (m, t), v in fer.items()},
    }


bench = {
    "default": bench_digest(out / "bench.json"),
    "channels_last_off": bench_digest(out / "bench_channels_last_off.json"),
}
decisions = {}
if bench["default"]:
    # bf16 vs fp32: the eager ceilings, per model.
    cz = bench["default"]["ceilings"]
    for model in sorted({k.split()[0] for k in cz}):
        f32, b16 = cz.get(f"{model} fp32_eager"), cz.get(f"{model} bf16_eager")
        if f32 and b16:
            decisions[f"{model}: bf16/fp32 eager ceiling"] = round(b16 / f32, 3)
        c = max(
            (v for k, v in cz.items() if k.startswith(f"{model} ") and "compile" in k), default=None
        )
        if c and f32:
            decisions[f"{model}: best compiled/fp32 eager ceiling"] = round(c / f32, 3)
if bench["default"] and bench["channels_last_off"]:
    on = bench["default"]["fer_sweep_images_per_second"]
    off = bench["channels_last_off"]["fer_sweep_images_per_second"]
    for key in sorted(set(on) & set(off)):
        if off[key]:
            decisions[f"{key}: channels_last on/off (fer_sweep img/s)"] = round(
                on[key] / off[key], 3
            )
row1 = next((r for r in runs if r["row"] == "row1"), None)
comp = next((r for r in runs if r["kind"] == "compile"), None)
if (
    row1
    and comp
    and row1["epoch_seconds_mean_after_first"]
    and comp["epoch_seconds_mean_after_first"]
    and not smoke
):
    decisions[
        "cnn2 norm: compiled/eager epoch seconds (after the 1st epoch; row1 shared the "
        "GPU with another job, so approximate)"
    ] = round(comp["epoch_seconds_mean_after_first"] / row1["epoch_seconds_mean_after_first"], 3)

# ------------------------------------------------------------------ checks
checks = []


def check(name, ok, detail=""):
    checks.append({"check": name, "ok": bool(ok), "detail": detail})


for p in phases:
    if p["name"] in OPTIONAL and p["status"] in ("ok", "skipped"):
        continue
    check(
        f"phase {p['name']}",
        p["status"] == "ok",
        f"{p['status']} after {p['seconds']} s" + (f" ({p['note']})" if p["note"] else ""),
    )
t2 = [r for r in runs if r["kind"] == "table2"]
rows_done = sorted({r["row"] for r in t2 if r["status"] == "FINISHED"})
check(
    "Table 2: all seven rows FINISHED, each once",
    rows_done == sorted(STUDY) and len(t2) == len(STUDY),
    f"finished {rows_done}; {len(t2)} Table 2 runs",
)
check(
    "compile run FINISHED",
    comp is not None and comp["status"] == "FINISHED",
    "no compile run" if comp is None else comp["status"],
)
fast = next((r for r in runs if r["kind"] == "fast"), None)
check(
    "experiment=fast FINISHED",
    fast is not None and fast["status"] == "FINISHED",
    "no experiment=fast run" if fast is None else fast["status"],
)
for r in runs:
    if not r["device"] or not r["precision"]:
        check(
            f"{r['name']}: device and precision tags", False, f"{r['device']!r} {r['precision']!r}"
        )
    if not smoke:
        check(f"{r['name']}: on CUDA", r["on_cuda"], f"device tag {r['device']!r}")
        if r["floor_pct"] is not None:
            check(
                f"{r['name']}: test accuracy >= {r['floor_pct']} %",
                r["pass_floor"],
                f"{r['test_acc_pct']} % (study {r['study_pct']} %)",
            )
if store_error:
    check("runs read from MLflow", False, store_error)
check(f"within the budget ({budget} s)", total <= budget, f"{total} s")

ok = all(c["ok"] for c in checks)
env_stopped = any(p["name"] == "env" and p["status"] != "ok" for p in phases)
code = 0 if ok else (2 if env_stopped else 1)
summary = {
    "ok": ok,
    "exit_code": code,
    "smoke": smoke,
    "budget_s": budget,
    "total_seconds": total,
    "failed_checks": [c["check"] for c in checks if not c["ok"]],
    "env": env,
    "phases": phases,
    "runs": runs,
    "checks": checks,
    "bench": bench,
    "decision_inputs": decisions,
    "mlflow_store": "mlflow.db",
    "store_error": store_error,
}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2))


# ------------------------------------------------------------------ markdown
def fmt(v, nd=None):
    if v is None:
        return "-"
    return f"{v:.{nd}f}" if nd is not None and isinstance(v, (int, float)) else str(v)


md = [
    f"# GPU check: {'OK' if ok else 'FAILED'}"
    + (" (smoke mode: no CUDA requirement, no accuracy floor)" if smoke else ""),
    "",
    f"{total} s of a {budget} s budget; exit status {code}.",
    "",
    f"- GPU: {env.get('gpu_name') or 'none'} ({fmt(env.get('gpu_memory_gib'))} GiB, "
    f"capability {fmt(env.get('gpu_capability'))}), nvidia-smi: {fmt(env.get('nvidia_smi'))}",
    f"- torch {fmt(env.get('torch'))}, CUDA {fmt(env.get('torch_cuda'))} (driver "
    f"{fmt(env.get('driver_cuda'))}), cuDNN {fmt(env.get('cudnn'))}, Python "
    f"{fmt(env.get('python'))}, {fmt(env.get('cpu_count'))} CPUs",
    f"- data: {fmt(env.get('data'))}",
    "",
]
for prob in env.get("problems", []):
    md += [f"- **environment problem**: {prob}", ""]
md += ["## Phases", "", "| phase | status | seconds | limit s | note |", "|---|---|---:|---:|---|"]
md += [
    f"| {p['name']} | {p['status']} | {p['seconds']} | {fmt(p['limit_s'])} | {p['note']} |"
    for p in phases
]
md += [
    "",
    "## Runs",
    "",
    "| run | model | status | device | device name | precision | epochs run "
    "(of) | stop | mean epoch s | test acc % | floor % | pass |",
    "|---|---|---|---|---|---|---:|---|---:|---:|---:|---|",
]
for r in runs:
    md.append(
        f"| {r['name']} | {r['model']} | {r['status']} | {r['device']} | {r['device_name']} | "
        f"{r['precision']} | {r['epochs_run']} ({fmt(r['epochs_configured'])}) | "
        f"{fmt(r['stop_reason'])} | {fmt(r['epoch_seconds_mean'], 2)} | "
        f"{fmt(r['test_acc_pct'], 1)} | {fmt(r['floor_pct'])} | "
        f"{'-' if r['pass_floor'] is None else ('yes' if r['pass_floor'] else '**NO**')} |"
    )
if not runs:
    md.append(f"| (no runs{': ' + store_error if store_error else ''}) |||||||||||")
md += ["", "## Checks", ""]
md += [f"- [{'x' if c['ok'] else ' '}] {c['check']}: {c['detail']}" for c in checks]
if decisions:
    md += ["", "## Inputs to the GPU decisions (ratios > 1: the first is faster)", ""]
    md += [f"- {k}: {v}" for k, v in decisions.items()]
for b in bench.values():
    if b and b.get("ratios"):
        md += [
            "",
            f"## Benchmark ({b['file']}: {b['device']} {b['device_name']}, {fmt(b['seconds'])} s)",
            "",
            "| model | transforms | precision | fer_sweep/ceiling | best ceiling | "
            "fer_sweep/best ceiling |",
            "|---|---|---|---:|---|---:|",
        ]
        md += [
            f"| {x['model']} | {x['transforms']} | {x.get('fer_sweep_precision')} | "
            f"{fmt(x.get('fer_sweep_over_ceiling'))} | {x.get('best_ceiling')} | "
            f"{fmt(x.get('fer_sweep_over_best_ceiling'))} |"
            for x in b["ratios"]
        ]
md += ["", "Logs: logs/<phase>.log; the runs: mlflow.db (sqlite); Table 2 rebuilt: report/.", ""]
(out / "gpu_check.md").write_text("\n".join(md))
print("\n".join(md))
sys.exit(code)
