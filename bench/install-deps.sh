#!/usr/bin/env bash
# The one system package the benchmarks need beyond the venv: Debian's ffmpeg, the reference that
# bench "audio_speed" compares the daemon's PyAV transcode against. The daemon itself never needs it.
# Idempotent; as root it installs, otherwise it says what to run and exits 1.
set -euo pipefail

if command -v ffmpeg >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "bench: ffmpeg is missing; install it with: sudo apt-get install -y ffmpeg" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "bench: ffmpeg is missing and there is no apt-get here; install ffmpeg by hand" >&2
    exit 1
fi
echo "bench: installing ffmpeg (apt-get, once; about a minute)" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends ffmpeg >/dev/null
command -v ffmpeg >/dev/null
