#!/usr/bin/env bash
# Go back to the last release that verified on this checkout, from its deploy history (run on the host,
# in the instance's checkout); the change itself is deploy.sh's, with the same checkpoints.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: scripts/rollback.sh [--yes] [--instance NAME] [--dir DIR] [--to TAG] [--history]
       make rollback [ARGS="--to prod-YYYY-MM-DD-N"]

Reads the checkout's deploy history (.git/sidecar-deploys, appended by scripts/deploy.sh: what was
deployed when, and whether it verified) and deploys the last release that verified before the current
one, with scripts/deploy.sh's checkpoints (the probe, checkpoint 2, is skipped). Never a release that
failed or never ran here: after -1 -> -3 it goes back to -1, not -2. A second rollback goes on to what
ran before that, not forward again. The plan shows the commits being removed. A failed verification of
the rollback is reported, not rolled back again.

Options:
  --yes             answer every confirmation with yes
  --instance NAME   the systemd instance (default: prod; prod goes back to prod tags only)
  --dir DIR         the instance's checkout (default: the current directory's repository)
  --to TAG          go back to this tag (prod: a prod-YYYY-MM-DD-N tag) instead, whatever the history says
  --history         print the deploy history and the release a rollback would choose; change nothing
  -h, --help        this text
EOF
}

# The history as a table, and the choice.
show_history() {
  local file
  file=$(history_file)
  if [[ ! -s $file ]]; then
    say "No deploy history yet ($PWD/$file): scripts/deploy.sh starts it."
  else
    say "Deploy history ($PWD/$file):"
    awk -F'\t' '!/^#/ { printf "  %-20s  %-8s  %-20s  %.12s  %s\n", $1, $2, $3, $4, $5 }' "$file" >&2
  fi
}

main() {
  local here dir="" to="" instance=prod list=0 pass=()
  here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
  # shellcheck source=scripts/lib-release.sh
  source "$here/lib-release.sh"

  while (($#)); do
    case $1 in
      --yes | -y) pass+=(--yes) ;;
      --history) list=1 ;;
      --instance | --dir | --to)
        [[ $# -ge 2 ]] || die "$1 needs a value"
        case $1 in
          --instance) instance=$2 ;;
          --dir) dir=$2 ;;
          --to) to=$2 ;;
        esac
        shift
        ;;
      -h | --help)
        usage
        return 0
        ;;
      *)
        usage >&2
        return 2
        ;;
    esac
    shift
  done

  cd "${dir:-.}" || die "no such directory: ${dir:-.}"
  cd "$(git rev-parse --show-toplevel 2>/dev/null)" || die "$PWD is not a git checkout"

  local current prod_only=0 target="" commit when how
  current=$(head_prod_tag)
  current=${current:-$(git rev-parse --short HEAD)}
  [[ $instance != prod ]] || prod_only=1
  IFS=$'\t' read -r target commit when how < <(history_rollback_target "$(git rev-parse HEAD)" "$prod_only") || true

  if ((list)); then
    show_history
    if [[ -n $target ]]; then
      say "make rollback would go from $current to $target ($how $when)"
    else
      say "make rollback has nothing to go back to from $current; name a release with --to"
    fi
    return 0
  fi

  if [[ -n $to ]]; then
    if [[ $instance == prod ]]; then is_prod_tag "$to" || die "not a prod tag: $to"; fi
    say "Rolling back from $current to $to (--to)"
  elif [[ -n $target ]]; then
    to=$target
    if [[ $how == found ]]; then
      say "Rolling back from $current to $to: it was running here at $when, when the deploy history began"
    else
      say "Rolling back from $current to $to: the last release that verified here before it ($when)"
    fi
  else
    show_history
    die "the deploy history records no release that verified here before $current; name one: make rollback ARGS='--to prod-YYYY-MM-DD-N'"
  fi

  # deploy.sh is read whole before it checks anything out, so running it from this checkout is safe.
  exec bash "$here/deploy.sh" "$to" --rollback --instance "$instance" --dir "$PWD" "${pass[@]}"
}

main "$@"
exit
