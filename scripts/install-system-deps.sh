#!/usr/bin/env bash
# Debian packages the test suite uses: espeak-ng (speech fixtures), prometheus (promtool and the
# end-to-end scrape test), systemd (systemd-analyze), logrotate (checks systemd/salestrainer-sidecar.logrotate),
# php-cli (tests/test_signing.py runs docs/contract.md's PHP snippet and test vectors with real PHP).
# Installs only what is missing, and only as root.
set -euo pipefail
packages=(espeak-ng prometheus systemd logrotate php-cli)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "note: not root or no apt-get; tests needing ${missing[*]} will be skipped with a reason" >&2
  exit 0
fi
echo "installing ${missing[*]}" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# Debian's prometheus package starts a server on :9090; the tests run their own.
systemctl disable --now prometheus >/dev/null 2>&1 || pkill -x prometheus || true
