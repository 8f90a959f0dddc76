"""Writes bench/results/latest.json, latest.md (the figures against their targets) and latest.png (matplotlib)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # the backend must be chosen before pyplot is imported

ORDER = ("concurrency", "sqs_requests", "cpu", "latency", "memory", "audio_speed", "long_recording", "peer",
         "quality", "local_rtf")


def load(path: Path) -> dict[str, Any]:
    if path.exists():
        try:
            return dict(json.loads(path.read_text()))
        except ValueError:
            pass
    return {"meta": {}, "benchmarks": {}}


def fmt(value: Any, unit: str) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and unit == "$":
        return f"${value:.2g}" if value < 0.01 else f"${value:.2f}"
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def write_markdown(results: dict[str, Any], path: Path) -> None:
    meta = results["meta"]
    lines = [
        "# Benchmark results",
        "",
        f"Machine: {meta.get('machine', '?')}; commit `{meta.get('commit', '?')}`.",
        "Produced by `make bench` (`.venv/bin/python -m bench`); see bench/README.md for what each figure means.",
        "",
        "| # | benchmark | figure | measured | target | met | run |",
        "|---|---|---|---|---|---|---|",
    ]
    for number, name in enumerate(ORDER, 1):
        bench = results["benchmarks"].get(name)
        if not bench:
            continue
        load = bench.get("machine", {})
        when = (f"{bench.get('finished', '?')}{' (quick)' if bench.get('quick') else ''}"
                + (f"; other processes used {load['cpu_busy_other_processes']:.0%} of the CPU" if load else ""))
        if bench.get("error"):
            lines.append(f"| {number} | {name} | error: {bench['error']} | | | | {when} |")
            continue
        for f in bench["figures"]:
            met = {True: "yes", False: "**no**", None: ""}[f["met"]]
            unit = "" if f["unit"] in ("", "$") else f" {f['unit']}"
            lines.append(f"| {number} | {bench['title']} | {f['label']} | {fmt(f['value'], f['unit'])}{unit} | "
                         f"{f['target']} | {met} | {when} |")
    path.write_text("\n".join(lines) + "\n")


def write_chart(results: dict[str, Any], path: Path) -> None:
    benches = results["benchmarks"]
    fig, axes = plt.subplots(3, 4, figsize=(24, 15))
    panels = [_concurrency, _sqs, _cpu, _latency, _memory, _audio, _long, _peer, _quality, _rtf]
    for ax, (name, draw) in zip(axes.flat, zip(ORDER, panels, strict=True), strict=False):
        bench = benches.get(name)
        if bench and not bench.get("error"):
            try:
                draw(ax, bench)
            except (KeyError, TypeError):  # kept from a run of an older version of this benchmark
                ax.clear()
                ax.set_title(f"{name}: figures of an older version; rerun --only {name}", fontsize=9)
                ax.axis("off")
        else:
            ax.set_title(f"{name}: not run")
            ax.axis("off")
    for unused in axes.flat[len(panels):-1]:
        unused.axis("off")
    info = axes.flat[-1]
    info.axis("off")
    meta = results["meta"]
    info.text(0, 0.9, "salestrainer-sidecar benchmarks", fontsize=13, weight="bold")
    info.text(0, 0.75, f"{meta.get('machine', '')}\ncommit {meta.get('commit', '')}\n{meta.get('finished', '')}",
              fontsize=9, va="top")
    info.text(0, 0.35, "dashed red: the target\nsee bench/README.md", fontsize=9, va="top")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _concurrency(ax: Any, b: dict[str, Any]) -> None:
    rows = b["rows"]
    xs = [str(r["concurrency"]) for r in rows]
    ax.bar(xs, [r["ideal_jobs_per_s"] for r in rows], color="#ddd", label="ideal (C / latency)")
    ax.bar(xs, [r["jobs_per_s"] for r in rows], color="#4477aa", width=0.5, label="measured")
    for i, r in enumerate(rows):
        ax.text(i, r["jobs_per_s"], f"{r['efficiency']:.2f}", ha="center", va="bottom", fontsize=9)
    ax.set(title="1. jobs/s vs CONCURRENCY (1 s latency)\nlabels: efficiency, target >= 0.9 at 16",
           xlabel="CONCURRENCY", ylabel="jobs/s")
    ax.legend(fontsize=8)


def _sqs(ax: Any, b: dict[str, Any]) -> None:
    ops = sorted({op for k in ("trickle", "backlog") for op in b[k]["by_operation_per_job"]})
    bottom = [0.0, 0.0]
    for op in ops:
        values = [b[k]["by_operation_per_job"].get(op, 0.0) for k in ("trickle", "backlog")]
        ax.bar(["trickle", "backlog"], values, bottom=bottom, label=op)
        bottom = [x + y for x, y in zip(bottom, values, strict=True)]
    idle = b["idle"]
    ax.set(title=f"2. SQS requests per job, by operation\nidle: {idle['receive_per_min']} receives/min + "
                 f"{idle['depth_polls_per_min']} depth polls/min", ylabel="requests / job")
    ax.legend(fontsize=7)


def _cpu(ax: Any, b: dict[str, Any]) -> None:
    by = b["data"]["cpu_ms_per_job_by_process"]
    ax.bar(list(by), list(by.values()), color=["#4477aa", "#aaaaaa", "#cccccc"][: len(by)])
    ax.axhline(5.0, color="red", linestyle="--")
    ax.set(title="3. CPU per job, zero-latency transcriber\n(target: daemon <= 5 ms)", ylabel="ms CPU / job")


def _latency(ax: Any, b: dict[str, Any]) -> None:
    for name, color in (("single", "#4477aa"), ("load", "#ee6677")):
        values = sorted(b["samples_ms"][name])
        if values:
            ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], color=color,
                    label=f"{'one at a time' if name == 'single' else '80 % load'}: p50 {b[name]['p50_ms']} ms, "
                          f"p99 {b[name]['p99_ms']} ms")
    ax.axvline(50, color="red", linestyle="--")
    ax.axvline(250, color="red", linestyle=":")
    ax.set_xscale("symlog", linthresh=10)
    ax.set(title="4. latency overhead (enqueue -> callback - stub)\ntargets one at a time: p50 50, p99 250 ms",
           xlabel="ms", ylabel="fraction of jobs")
    ax.legend(fontsize=7, loc="lower right")


def _memory(ax: Any, b: dict[str, Any]) -> None:
    rows = b["rows"]
    ax.bar([f"{r['megabytes']} MB\n{r['audio_min']} min" for r in rows], [r["peak_rss_mb"] for r in rows],
           color="#4477aa")
    ax.axhline(250, color="red", linestyle="--")
    ax.set(title="5. daemon peak RSS (VmHWM) per recording", ylabel="MB")


def _audio(ax: Any, b: dict[str, Any]) -> None:
    names, values = ["prepare (PyAV)"], [b["prepare_audio_s_per_cpu_s"]]
    for key, label in (("ffmpeg", "ffmpeg CLI"), ("ffmpeg_matched", "ffmpeg, same\nOpus options")):
        if key in b:
            names.append(label)
            values.append(b[key]["audio_s_per_cpu_s"])
    ax.bar(names, values, color=["#4477aa", "#aaaaaa", "#cccccc"][: len(names)])
    ax.set(title=f"6. audio seconds prepared per CPU second\n({b['audio_s'] / 60:.0f} min WAV -> Ogg/Opus)",
           ylabel="x realtime")


def _long(ax: Any, b: dict[str, Any]) -> None:
    recordings = b["recordings"]
    names = [f"{r['minutes']} min\n{'WebM' if r['kind'] == 'webm' else 'WAV'}" for r in recordings]
    series = [("lower bound", "#cccccc", [r["runs"]["parallel"]["lower_bound_s"] for r in recordings]),
              ("default parallelism", "#4477aa", [r["runs"]["parallel"]["wall_s"] for r in recordings]),
              ("parts one after another", "#aaaaaa", [r["runs"]["sequential"]["wall_s"] for r in recordings])]
    width = 0.27
    for i, (label, color, values) in enumerate(series):
        ax.bar([x + (i - 1) * width for x in range(len(recordings))], values, width, label=label, color=color)
    for x, r in enumerate(recordings):
        ax.text(x, r["runs"]["sequential"]["wall_s"], f"{r['over_bound']}x bound\n{r['speedup']}x faster",
                ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(recordings)), names)
    ax.set_title(f"7. long recordings, send to callback (targets on 60 min: <= 1.3x bound, >= 6x faster)\n"
                 f"stand-in {b['config']['stand_in']}", fontsize=10)
    ax.set_ylabel("wall seconds")
    ax.set_ylim(0, max(series[2][2]) * 1.35)  # room for the legend above the bars
    ax.legend(fontsize=7, loc="upper left", ncol=3)
    ax.tick_params(axis="x", labelsize=8)


def _peer(ax: Any, b: dict[str, Any]) -> None:
    rows = [r for r in b["table"] if r["ratio"] is not None]
    ax.barh([r["label"] for r in rows], [r["ratio"] for r in rows], color="#4477aa")
    ax.axvline(1.0, color="red", linestyle="--")
    for i, r in enumerate(rows):
        ax.text(r["ratio"], i, f" {r['ratio']}", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title("8. ours / bbc/sqs-consumer, same stack\n(1 = the same; README: which way is better)", fontsize=10)
    ax.set_xlabel("ratio")


def _quality(ax: Any, b: dict[str, Any]) -> None:
    runs = b["runs"]
    names = ["long,\nwhole", "long +\ndither", f"long, cut\n({sum(runs['long_cut']['parts'])} parts)",
             "readings,\nwhole", f"readings, cut\n({sum(runs['readings_cut']['parts'])} parts)"]
    values = [runs[k]["wer"] * 100 for k in ("long_whole", "long_dithered", "long_cut", "readings_whole",
                                              "readings_cut")]
    ax.bar(names, values, color=["#aaaaaa", "#cccccc", "#4477aa", "#aaaaaa", "#4477aa"])
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.2f} %", ha="center", va="bottom", fontsize=9)
    ax.set_title(f"9. WER, {b['config']['model']}, {b['audio_s'] / 60:.1f} min of espeak-ng speech\n"
                 f"long: cut - whole {b['difference_pp']:+.2f} points (target within 0.5)", fontsize=10)
    ax.set_ylabel("WER %")
    ax.tick_params(axis="x", labelsize=8)


def _rtf(ax: Any, b: dict[str, Any]) -> None:
    rows = b["rows"]
    xs = [f"{r['minutes']:g} min" for r in rows]
    width = 0.38
    for offset, key, label, color in ((-width / 2, "rtf", "the daemon's path", "#aaaaaa"),
                                      (width / 2, "batched_rtf", "BatchedInferencePipeline", "#4477aa")):
        values = [r.get(key) or 0 for r in rows]
        ax.bar([i + offset for i in range(len(rows))], values, width, label=label, color=color)
    ax.set_xticks(range(len(rows)), xs)
    ax.set_title("10. local faster-whisper real-time factor\n(wall time / audio time; lower is faster)", fontsize=10)
    ax.set_ylabel("RTF")
    ax.legend(fontsize=8)
