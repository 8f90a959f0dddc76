#!/usr/bin/env bash
# The system packages the benchmarks need beyond the venv: Debian's ffmpeg, the reference that bench
# "audio_speed" compares the daemon's PyAV transcode against, and espeak-ng, which reads the known text of
# bench "quality" and "local_rtf". The daemon itself needs neither. (The peer benchmark's node and
# sqs-consumer come from npm into .cache/bench-peer; npm itself is Debian's.)
# Idempotent; as root it installs, otherwise it says what to run and exits 1.
set -euo pipefail

missing=()
command -v ffmpeg >/dev/null 2>&1 || missing+=(ffmpeg)
command -v espeak-ng >/dev/null 2>&1 || missing+=(espeak-ng)
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "bench: ${missing[*]} missing; install with: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "bench: ${missing[*]} missing and there is no apt-get here; install by hand" >&2
    exit 1
fi
echo "bench: installing ${missing[*]} (apt-get, once; about a minute)" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
command -v ffmpeg >/dev/null && command -v espeak-ng >/dev/null
