#!/usr/bin/env bash
# Redeploy the prod tag before the one the checkout is at (run on the host, in the instance's checkout).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: scripts/rollback.sh [--yes] [--instance NAME] [--dir DIR] [--to TAG]

Finds the prod-YYYY-MM-DD-N tag the checkout is at, picks the one before it (tag order: date, then N)
and deploys that with scripts/deploy.sh, with the same checkpoints. A failed verification of the
rollback is reported, not rolled back again.

Options:
  --yes             answer every confirmation with yes
  --instance NAME   the systemd instance (default: prod)
  --dir DIR         the instance's checkout (default: the current directory's repository)
  --to TAG          roll back to this prod tag instead of the previous one
  -h, --help        this text
EOF
}

main() {
  local here dir="" to="" pass=()
  here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
  # shellcheck source=scripts/lib-release.sh
  source "$here/lib-release.sh"

  while (($#)); do
    case $1 in
      --yes | -y) pass+=(--yes) ;;
      --instance | --dir | --to)
        [[ $# -ge 2 ]] || die "$1 needs a value"
        case $1 in
          --instance) pass+=(--instance "$2") ;;
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

  if [[ -z $to ]]; then
    local current
    current=$(head_prod_tag)
    [[ -n $current ]] ||
      die "HEAD ($(git rev-parse --short HEAD)) is not at a prod tag; deploy one with: scripts/deploy.sh TAG"
    to=$(prev_prod_tag "$current")
    [[ -n $to ]] || die "$current is the first prod tag; there is nothing to roll back to"
    say "Rolling back from $current to $to"
  fi
  is_prod_tag "$to" || die "not a prod tag: $to"

  # deploy.sh is read whole before it checks anything out, so running it from this checkout is safe.
  exec bash "$here/deploy.sh" "$to" --no-rollback --dir "$PWD" "${pass[@]}"
}

main "$@"
exit
