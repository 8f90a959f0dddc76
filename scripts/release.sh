#!/usr/bin/env bash
# Tag the next production release prod-YYYY-MM-DD-N and push it to origin (run on a workstation).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: scripts/release.sh [--yes] [--dry-run] [--remote NAME]

Tags HEAD as the next production release, prod-YYYY-MM-DD-N (today's date; N counts today's releases
from 1), after showing the commits since the last prod tag and asking for confirmation, then pushes the
annotated tag. Deploy it on the host with `make deploy TAG=prod-YYYY-MM-DD-N`.

Options:
  --yes          do not ask for confirmation
  --dry-run      show the next tag and the commits, change nothing
  --remote NAME  the remote to fetch tags from and push to (default: origin)
  -h, --help     this text

Environment:
  RELEASE_DATE   the YYYY-MM-DD to use instead of today's local date
EOF
}

main() {
  local here remote=origin dry_run=0
  here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
  # shellcheck source=scripts/lib-release.sh
  source "$here/lib-release.sh"

  while (($#)); do
    case $1 in
      --yes | -y) ASSUME_YES=1 ;;
      --dry-run) dry_run=1 ;;
      --remote)
        [[ $# -ge 2 ]] || die "--remote needs a name"
        remote=$2
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

  git rev-parse --git-dir >/dev/null 2>&1 || die "not inside a git repository"
  cd "$(git rev-parse --show-toplevel)"

  local date
  date=${RELEASE_DATE:-$(date +%Y-%m-%d)}
  [[ $date =~ ^[0-9]{4}-[0-9]{2}-[0-9]{2}$ ]] || die "RELEASE_DATE must be YYYY-MM-DD, not '$date'"

  # Count the tags others have pushed today too, so two releases never pick the same N.
  step "Fetching tags from $remote"
  git fetch --quiet --tags "$remote" </dev/null || die "could not fetch tags from $remote"

  if [[ -n $(git status --porcelain --untracked-files=no) ]]; then
    say "warning: uncommitted changes are not part of the release (the tag is on HEAD)"
  fi

  local tag last head_tag
  tag=$(next_prod_tag "$date")
  last=$(prod_tags | tail -n 1)
  head_tag=$(head_prod_tag)
  [[ -z $head_tag ]] || die "HEAD is already released as $head_tag"

  step "Next tag: $tag"
  say "Commit: $(git log -1 --format='%h %s' HEAD)"
  if [[ -n $last ]]; then
    say "Commits since $last:"
    git --no-pager log --oneline --no-decorate "$last..HEAD" >&2
  else
    say "No earlier prod tag; commits in this first release:"
    git --no-pager log --oneline --no-decorate -n 50 HEAD >&2
  fi

  if ((dry_run)); then
    say "(dry run: nothing tagged)"
    return 0
  fi
  confirm "Create $tag on $(git rev-parse --short HEAD) and push it to $remote?" || {
    say "aborted: nothing tagged"
    return 1
  }

  git tag --annotate "$tag" --message "Release $tag" HEAD
  if ! git push --quiet "$remote" "refs/tags/$tag" </dev/null; then
    git tag --delete "$tag" >/dev/null
    die "push of $tag to $remote failed; the local tag was removed"
  fi
  step "Released $tag"
  say "Next, on the host in the prod checkout: make deploy TAG=$tag"
  printf '%s\n' "$tag"
}

main "$@"
exit
