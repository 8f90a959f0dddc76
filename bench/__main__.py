"""`python -m bench`: run the benchmarks on the local stack and write bench/results/latest.{json,md,png}.

Benchmarks print and save figures; they assert nothing (a missed target is reported, not raised).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import audio_prep, latency, long_calls, memory, peer, report, speech, sqs_requests, throughput
from bench.common import Bench
from bench.stack import CLK_TCK, ROOT, proc_cpu_seconds

BENCHMARKS: dict[str, tuple[Callable[[Bench], dict[str, Any]], str]] = {
    "concurrency": (throughput.concurrency, "1. jobs/s at CONCURRENCY 1, 4, 16, 32 with 1 s transcriptions"),
    "sqs_requests": (sqs_requests.run, "2. SQS requests per job (trickle, backlog) and per idle minute"),
    "cpu": (throughput.cpu, "3. daemon CPU per job with a zero-latency transcriber"),
    "latency": (latency.run, "4. enqueue-to-callback overhead, one at a time and at 80 % load"),
    "memory": (memory.run, "5. daemon peak RSS on 10, 100 and 500 MB recordings"),
    "audio_speed": (audio_prep.speed, "6. audio prepared per CPU second, against the ffmpeg CLI"),
    "long_recording": (long_calls.run, "7. 10, 30, 60-min WebM and WAV calls: wall time against its bound"),
    "peer": (peer.run, "8. against bbc/sqs-consumer on the same stack: the issue 15 table as ours/peer ratios"),
    "quality": (speech.quality, "9. local Whisper word error rate, 17 min of speech whole vs cut as the daemon cuts"),
    "local_rtf": (speech.local_rtf, "10. local faster-whisper real-time factor for 1, 10 and 30 minutes"),
}
RESULTS = ROOT / "bench" / "results"


def parser() -> argparse.ArgumentParser:
    listing = "\n".join(f"  {name:<15} {text}" for name, (_, text) in BENCHMARKS.items())
    p = argparse.ArgumentParser(
        prog="python -m bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Benchmarks of the sidecar daemon on a local stack: moto (SQS+S3) in its own process, an "
                    "OpenAI stand-in with a configurable latency, and a callback receiver. Each daemon runs as "
                    "a `python -m consumer run` subprocess. Writes bench/results/latest.json, latest.md and "
                    "latest.png; with --only, the other benchmarks' previous figures are kept.",
        epilog=f"benchmarks:\n{listing}\n\nThe whole run takes about 35 minutes on 2 cores.")
    p.add_argument("--only", action="append", choices=list(BENCHMARKS), metavar="NAME",
                   help="run only this benchmark (repeatable); names below")
    p.add_argument("--quick", action="store_true",
                   help="fewer jobs, shorter windows, smaller recordings (a smoke run; figures are noisier)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory (default: bench/results)")
    return p


def _meta() -> dict[str, Any]:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                            check=False).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "consumer"], cwd=ROOT, capture_output=True,
                           text=True, check=False).stdout.split("\n")
    changed = sorted(line[3:] for line in dirty if line.strip())
    return {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Linux {platform.release()}, "
                       f"Python {platform.python_version()}",
            "commit": (commit or "?") + (" + uncommitted changes to " + ", ".join(changed) if changed else ""),
            "finished": _now()}


def _machine_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine from /proc/stat: anything else running shows up here."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def _own_cpu(b: Bench) -> float:
    """CPU seconds of this process, its waited-for children (daemons, ffmpeg) and moto."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime + proc_cpu_seconds(b.moto.pid)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    names = [n for n in BENCHMARKS if not args.only or n in args.only]
    args.out.mkdir(parents=True, exist_ok=True)
    results = report.load(args.out / "latest.json")
    failed = 0
    with Bench.open(quick=args.quick) as b:
        b.say(f"local stack up: moto {b.moto.endpoint}, OpenAI stand-in {b.openai.base_url}; "
              f"running {', '.join(names)}{' (quick)' if args.quick else ''}")
        for name in names:
            fn, text = BENCHMARKS[name]
            b.say(f"== {text}")
            started, tree = time.monotonic(), _meta()["commit"]  # the daemons run what is checked out now
            cpu0, own0, load0 = _machine_cpu(), _own_cpu(b), os.getloadavg()[0]
            try:
                entry = fn(b)
            except Exception as exc:  # noqa: BLE001 - one failed benchmark must not lose the others' figures
                traceback.print_exc()
                entry = {"title": name, "error": f"{type(exc).__name__}: {exc}", "figures": []}
                failed += 1
            busy, total = (y - x for x, y in zip(cpu0, _machine_cpu(), strict=True))
            foreign = max(0.0, busy / CLK_TCK - (_own_cpu(b) - own0)) / max(total / CLK_TCK, 1e-9)
            entry.update(elapsed_s=round(time.monotonic() - started, 1), finished=_now(), quick=args.quick,
                         commit=tree, machine={"cpu_busy": round(busy / max(total, 1), 2),
                                               "cpu_busy_other_processes": round(foreign, 2),
                                               "loadavg_1min_start": round(load0, 2),
                                               "loadavg_1min_end": round(os.getloadavg()[0], 2)})
            results["benchmarks"][name] = entry
            for f in entry["figures"]:
                mark = {True: "met", False: "MISSED", None: ""}[f["met"]]
                unit = "" if f["unit"] == "$" else f" {f['unit']}"
                b.say(f"   {f['label']}: {report.fmt(f['value'], f['unit'])}{unit}"
                      f"{'  target ' + f['target'] if f['target'] else ''} {mark}")
            _write(results, args.out)  # after each benchmark: an interrupted run keeps what it measured
        b.say(f"done; results in {args.out}")
    return 1 if failed else 0


def _write(results: dict[str, Any], out: Path) -> None:
    results["meta"] = _meta()
    (out / "latest.json").write_text(json.dumps(results, indent=1) + "\n")
    report.write_markdown(results, out / "latest.md")
    report.write_chart(results, out / "latest.png")


if __name__ == "__main__":
    sys.exit(main())
