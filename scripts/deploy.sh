#!/usr/bin/env bash
# Deploy a release tag to one instance on the host: fetch, check out detached, install, restart, verify.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: scripts/deploy.sh TAG [--yes] [--instance NAME] [--dir DIR] [--no-rollback] [--rollback]

Run on the host, in the instance's checkout (/opt/salestrainer-sidecar/<instance>). Fetches tags,
shows the commits being added and removed, checks TAG out as a detached HEAD, installs it into .venv,
restarts salestrainer-sidecar@<instance> (stop, then start) and verifies, pausing at each checkpoint
("Does this look correct? [y/N]"):
  1. git describe --tags is TAG
  2. the new release's `sidecar check --probe` passes with the instance's env file, before the restart:
     the configuration, S3, SQS and the callback host are reachable, and the transcription endpoint
     transcribes a one-second clip sent exactly as a job's would be (a model or format it refuses
     stops the deploy here, with the API's own error, before any traffic meets it)
  3. systemctl start succeeds and is-active says active (a failed start shows the journal's last 50 lines)
  4. GET /health answers 200 (port: METRICS_PORT of /etc/salestrainer-sidecar/<instance>.env, default 9002)
  5. journalctl -p err shows nothing since this release was started (the window opens after the old
     release has stopped, so neither its shutdown nor an earlier failed attempt counts)
A failed check (or a "n" after the change) offers to roll back to the last release that verified on
this checkout, from its deploy history (.git/sidecar-deploys: every change, and whether it verified);
with --yes the rollback is performed. Either way the exit status is 1.

The prod instance accepts only prod-YYYY-MM-DD-N tags; other instances take any tag, branch or commit.

Options:
  --yes             answer every confirmation with yes (unattended)
  --instance NAME   the systemd instance (default: prod)
  --dir DIR         the instance's checkout (default: the current directory's repository)
  --no-rollback     on failure, report and exit 1 without rolling back
  --rollback        this change is a rollback (rollback.sh passes it): asks "Roll back …?", recorded as
                    one in the history, no probe (checkpoint 2), and no rollback of the rollback
  -h, --help        this text

Environment (mainly for tests):
  DEPLOY_INSTALL_CMD     install command run with bash in the checkout
                         (default: create .venv if missing, then .venv/bin/pip install -q -e .)
  DEPLOY_PROBE_CMD       the checkpoint-2 command, run with bash in the checkout; $ENV_FILE names the
                         instance's env file (default: .venv/bin/sidecar --env-file "$ENV_FILE" check --probe,
                         under DEPLOY_SUDO; a rollback skips it: it must not wait for the endpoint)
  DEPLOY_ENV_DIR         directory of the instance env files (default: /etc/salestrainer-sidecar)
  DEPLOY_HEALTH_URL      health URL (default: http://127.0.0.1:<METRICS_PORT>/health)
  DEPLOY_HEALTH_TIMEOUT  seconds to wait for /health to answer 200 (default: 60)
  DEPLOY_SUDO            prefix for systemctl restart and journalctl (default: sudo unless root)
  DEPLOY_REMOTE          the remote to fetch from (default: origin)
EOF
}

DEFAULT_INSTALL_CMD='if [ ! -x .venv/bin/pip ]; then python3 -m venv .venv; fi; .venv/bin/pip install -q -e .'
DEFAULT_PROBE_CMD='.venv/bin/sidecar --env-file "$ENV_FILE" check --probe'

# Globals set by main(): INSTANCE UNIT DIR REMOTE SUDO NO_ROLLBACK MODE TARGET; per attempt ATTEMPT_NAME,
# ATTEMPT_COMMIT (what the history records) and STARTED_AT (where the journal check's window opens).

describe_head() {
  git describe --tags --exact-match HEAD 2>/dev/null || git rev-parse --short HEAD
}

# The value of VAR in an env file (last assignment wins; quotes and `export` allowed), or empty.
env_value() {
  local file=$1 var=$2 text=""
  if [[ -r $file ]]; then
    text=$(<"$file")
  elif [[ -e $file && -n $SUDO ]]; then
    text=$($SUDO cat "$file" 2>/dev/null || true)
  fi
  printf '%s\n' "$text" |
    sed -nE "s/^[[:space:]]*(export[[:space:]]+)?${var}[[:space:]]*=[[:space:]]*['\"]?([^'\"#[:space:]]*).*$/\\2/p" |
    tail -n 1
}

health_url() {
  if [[ -n ${DEPLOY_HEALTH_URL:-} ]]; then
    printf '%s\n' "$DEPLOY_HEALTH_URL"
    return
  fi
  local env_file="${DEPLOY_ENV_DIR:-/etc/salestrainer-sidecar}/$INSTANCE.env" port host
  port=$(env_value "$env_file" METRICS_PORT)
  host=$(env_value "$env_file" METRICS_HOST)
  case $host in "" | 0.0.0.0 | "::" | "[::]") host=127.0.0.1 ;; esac
  printf 'http://%s:%s/health\n' "$host" "${port:-9002}"
}

# GET URL → "<status> <body>" on stdout (status 000 when nothing answers).
http_get() {
  local url=$1
  if command -v curl >/dev/null; then
    local body code
    body=$(mktemp)
    code=$(curl --noproxy '*' -sS -m 5 -o "$body" -w '%{http_code}' "$url" 2>/dev/null) || true
    printf '%s %s\n' "${code:-000}" "$(head -c 500 "$body")"
    rm -f "$body"
  else
    python3 - "$url" <<'PY'
import sys, urllib.error, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    with opener.open(sys.argv[1], timeout=5) as r:
        print(r.status, r.read(500).decode(errors="replace"))
except urllib.error.HTTPError as e:
    print(e.code, e.read(500).decode(errors="replace"))
except OSError:
    print("000")
PY
  fi
}

# A checkpoint after the change: "n" counts as a failed verification.
checkpoint() {
  confirm "Does this look correct?" || fail "not confirmed by the operator at: $1"
}

# What to roll back to after a failed change to COMMIT: the last release that verified on this checkout
# (the deploy history's line, see lib-release.sh), as "REF<TAB>COMMIT<TAB>TIME<TAB>HOW"; prod: tags only.
rollback_target() {
  local prod_only=0
  [[ $INSTANCE != prod ]] || prod_only=1
  history_rollback_target "$1" "$prod_only"
}

# The last lines of the unit's journal, whatever their priority: why a start failed is usually there.
journal_tail() {
  say ""
  say "The last 50 lines of the journal of $UNIT:"
  $SUDO journalctl -u "$UNIT" -n 50 --no-pager </dev/null >&2 || say "(journalctl -u $UNIT failed)"
}

# fail [--tail] REASON: record the failed attempt, show the journal's tail (--tail), offer the rollback.
fail() {
  local tail=0
  if [[ $1 == --tail ]]; then
    tail=1
    shift
  fi
  say ""
  say "VERIFICATION FAILED: $1"
  [[ -z ${ATTEMPT_COMMIT:-} ]] || history_add failed "$ATTEMPT_NAME" "$ATTEMPT_COMMIT" "$1"
  if ((tail)); then journal_tail; fi
  if ((NO_ROLLBACK)); then
    say "$UNIT is now at $(describe_head) and did not verify; not rolling back. Check: journalctl -u $UNIT -e"
    exit 1
  fi
  local back="" when="" how=""
  IFS=$'\t' read -r back _ when how < <(rollback_target "${ATTEMPT_COMMIT:-}") || true
  if [[ -z $back ]]; then
    say "The deploy history has no release that verified here to roll back to. Check: journalctl -u $UNIT -e"
    exit 1
  fi
  say ""
  say "The last release that verified here: $back ($how $when)"
  NO_ROLLBACK=1
  DECLINED="Not rolling back; $UNIT stays at $(describe_head). To roll back later: make rollback"
  deploy_ref "$back" rollback "$back"
  say "Rolled back to $back; the deploy of $TARGET failed: $1"
  exit 1
}

# The history begins an attempt: the release found at HEAD (when the history does not end there), then
# the change itself.
record_start() {
  local mode=$1 name=$2 commit=$3 head found
  head=$(git rev-parse HEAD)
  if [[ $(history_last_commit) != "$head" ]]; then
    found=$(head_prod_tag)
    history_add found "${found:-$(describe_head)}" "$head" "at HEAD before this $mode"
  fi
  history_add "$mode" "$name" "$commit" "from $head"
  ATTEMPT_NAME=$name
  ATTEMPT_COMMIT=$commit
}

# Check out REF detached, install, restart and verify. MODE is "deploy" or "rollback"; NAME is what the
# operator asked for (a tag, or for non-prod instances a branch or commit), recorded in the history.
deploy_ref() {
  local ref=$1 mode=$2 name=$3 question commit from described stamp
  commit=$(git rev-parse --verify --quiet "$ref^{commit}") || die "unknown ref: $ref"
  from=$(describe_head)

  step "$mode: $UNIT  $from -> $name  (checkout $DIR)"
  show_changes HEAD "$commit"
  if [[ $mode == deploy ]]; then question="Deploy $name to $UNIT?"; else question="Roll back $UNIT to $name?"; fi
  confirm "$question" || {
    say "${DECLINED:-aborted: nothing changed}"
    exit 1
  }
  record_start "$mode" "$name" "$commit"

  git -c advice.detachedHead=false checkout --quiet --detach "$commit" ||
    fail "git checkout $ref failed"
  step "Installing into $DIR/.venv"
  bash -c "${DEPLOY_INSTALL_CMD:-$DEFAULT_INSTALL_CMD}" </dev/null || fail "install failed"
  # The daemon reads RELEASE at start-up: /health, sidecar_build_info and its logs name the tag that runs.
  stamp=$ref
  [[ $ref != "$commit" ]] || stamp=$(describe_head)
  { printf '%s\n' "$stamp" >RELEASE.tmp && mv -f RELEASE.tmp RELEASE; } || fail "cannot write $DIR/RELEASE"

  step "Checkpoint 1/5: version"
  described=$(git describe --tags 2>/dev/null || git rev-parse --short HEAD)
  say "git describe --tags: $described"
  if [[ $ref == "$commit" ]]; then
    [[ $(git rev-parse HEAD) == "$commit" ]] || fail "HEAD is not $commit"
  elif [[ $described != "$ref" ]]; then
    git tag --points-at HEAD | grep -qxF "$ref" || fail "git describe --tags is $described, not $ref"
  fi
  checkpoint "version"

  if [[ $mode == deploy ]]; then
    step "Checkpoint 2/5: sidecar check --probe (the new release, before the restart)"
    $SUDO env ENV_FILE="${DEPLOY_ENV_DIR:-/etc/salestrainer-sidecar}/$INSTANCE.env" \
      bash -c "${DEPLOY_PROBE_CMD:-$DEFAULT_PROBE_CMD}" </dev/null >&2 ||
      fail "sidecar check --probe failed (see its [FAIL] lines above); $UNIT still runs the old release"
    checkpoint "probe"
  fi

  step "Checkpoint 3/5: restart (stop, then start)"
  # Stop, then start, rather than restart: the journal window of checkpoint 5 opens between the two, so
  # neither what the old release logs while stopping nor what an earlier failed attempt logged in the
  # same second (systemd logs "Failed to start" at err) counts against this release. The window is
  # fractional: journalctl takes `--since @<epoch>.<fraction>` (docs/reality.md).
  $SUDO systemctl stop "$UNIT" </dev/null || fail --tail "systemctl stop $UNIT failed"
  STARTED_AT=$(date +%s.%N)
  # Type=notify: this returns once the daemon has said READY=1 (its first successful receive).
  $SUDO systemctl start "$UNIT" </dev/null || fail --tail "systemctl start $UNIT failed"
  local state
  state=$(systemctl is-active "$UNIT" </dev/null || true)
  say "systemctl is-active $UNIT: $state"
  [[ $state == active ]] || fail --tail "$UNIT is $state"
  checkpoint "restart"

  step "Checkpoint 4/5: health"
  local url answer deadline=$((SECONDS + ${DEPLOY_HEALTH_TIMEOUT:-60}))
  url=$(health_url)
  while :; do
    answer=$(http_get "$url")
    [[ ${answer%% *} == 200 || $SECONDS -ge $deadline ]] && break
    sleep 0.5
  done
  say "GET $url -> $answer"
  [[ ${answer%% *} == 200 ]] || fail --tail "$url answered ${answer%% *}, not 200"
  checkpoint "health"

  step "Checkpoint 5/5: errors in the journal since $name was started"
  local errors
  errors=$($SUDO journalctl -u "$UNIT" --since "@$STARTED_AT" -p err --no-pager -q -o short-iso </dev/null) ||
    fail "journalctl -u $UNIT failed"
  if [[ -n $errors ]]; then
    printf '%s\n' "$errors" >&2
    fail "errors in the journal of $UNIT"
  fi
  say "(none)"
  checkpoint "journal"

  history_add verified "$name" "$commit"
  step "$UNIT runs $name (verified; recorded in $DIR/$(history_file))"
}

main() {
  local here tag="" dir=""
  here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
  # shellcheck source=scripts/lib-release.sh
  source "$here/lib-release.sh"

  INSTANCE=prod
  NO_ROLLBACK=0
  MODE=deploy
  while (($#)); do
    case $1 in
      --yes | -y) ASSUME_YES=1 ;;
      --instance | --dir)
        [[ $# -ge 2 ]] || die "$1 needs a value"
        if [[ $1 == --instance ]]; then INSTANCE=$2; else dir=$2; fi
        shift
        ;;
      --no-rollback) NO_ROLLBACK=1 ;;
      --rollback)
        MODE=rollback
        NO_ROLLBACK=1
        ;;
      -h | --help)
        usage
        return 0
        ;;
      -*)
        usage >&2
        return 2
        ;;
      *)
        [[ -z $tag ]] || die "one TAG only (got $tag and $1)"
        tag=$1
        ;;
    esac
    shift
  done
  if [[ -z $tag ]]; then
    usage >&2
    return 2
  fi
  [[ $INSTANCE =~ ^[a-z0-9][a-z0-9_-]*$ ]] || die "bad instance name: $INSTANCE"
  if [[ $INSTANCE == prod ]] && ! is_prod_tag "$tag"; then
    die "the prod instance deploys only prod-YYYY-MM-DD-N tags, not '$tag'"
  fi

  UNIT="salestrainer-sidecar@$INSTANCE"
  REMOTE=${DEPLOY_REMOTE:-origin}
  if [[ -n ${DEPLOY_SUDO+set} ]]; then
    SUDO=$DEPLOY_SUDO
  elif [[ $(id -u) -eq 0 ]]; then
    SUDO=""
  else
    SUDO=sudo
  fi

  cd "${dir:-.}" || die "no such directory: ${dir:-.}"
  DIR=$(git rev-parse --show-toplevel 2>/dev/null) || die "$PWD is not a git checkout"
  cd "$DIR"
  [[ $(basename "$DIR") == "$INSTANCE" ]] ||
    say "warning: checkout $DIR is not named after instance $INSTANCE"

  step "Fetching from $REMOTE"
  git fetch --quiet --tags "$REMOTE" </dev/null || die "git fetch --tags $REMOTE failed"
  if [[ -n $(git status --porcelain --untracked-files=no) ]]; then
    die "the checkout $DIR has local changes; refusing to deploy over them"
  fi
  local history
  history=$(history_file)
  touch "$history" 2>/dev/null || die "cannot write the deploy history $DIR/$history; run as the checkout's owner"

  local ref=$tag
  if ! git rev-parse --verify --quiet "refs/tags/$tag" >/dev/null; then
    [[ $INSTANCE != prod ]] || die "no such tag: $tag (was it pushed? scripts/release.sh pushes it)"
    if git rev-parse --verify --quiet "refs/remotes/$REMOTE/$tag" >/dev/null; then
      ref=$(git rev-parse "refs/remotes/$REMOTE/$tag")
    else
      ref=$(git rev-parse --verify --quiet "$tag^{commit}") || die "no such tag, branch or commit: $tag"
    fi
  fi

  TARGET=$tag
  deploy_ref "$ref" "$MODE" "$tag"
}

main "$@"
exit
