#!/usr/bin/env bash
# Tag the next production release prod-YYYY-MM-DD-N and push it to origin (run on a workstation).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: scripts/release.sh [--yes] [--dry-run] [--remote NAME] [--force-from-here]

Tags HEAD as the next production release, prod-YYYY-MM-DD-N (today's date; N counts today's releases
from 1), after showing the commits since the last prod tag and asking for confirmation, then pushes the
annotated tag. Deploy it on the host with `make deploy TAG=prod-YYYY-MM-DD-N`.

It releases only `main` as everyone has it: HEAD must be on the branch main, without uncommitted
changes to tracked files, and level with <remote>/main (just fetched): nothing unpushed, nothing
missing. Otherwise it says what differs and exits 1 (a dry run too).

Options:
  --yes              do not ask for confirmation
  --dry-run          show the next tag and the commits, change nothing
  --remote NAME      the remote to fetch tags and main from and push to (default: origin)
  --force-from-here  emergencies only: release HEAD although it is not main level with <remote>/main;
                     the tag's message records what differed
  -h, --help         this text

Environment:
  RELEASE_DATE   the YYYY-MM-DD to use instead of today's local date
EOF
}

# What keeps HEAD from being a release, one line each (nothing when it may be released): not on main,
# uncommitted changes to tracked files, commits not pushed to REMOTE/main or not pulled from it.
source_problems() {
  local remote=$1 branch counts ahead behind
  branch=$(git symbolic-ref --quiet --short HEAD) || branch=""
  if [[ -z $branch ]]; then
    printf 'HEAD is detached, not the branch main: git switch main\n'
  elif [[ $branch != main ]]; then
    printf 'HEAD is on the branch %s, not the branch main: git switch main\n' "$branch"
  fi
  if [[ -n $(git status --porcelain --untracked-files=no) ]]; then
    printf 'uncommitted changes to tracked files: commit and push them, or stash them\n'
  fi
  counts=$(git rev-list --left-right --count "HEAD...refs/remotes/$remote/main")
  read -r ahead behind <<<"$counts"
  if ((ahead)); then
    printf '%d commit(s) on HEAD are not on %s/main: push them (through review) first\n' "$ahead" "$remote"
  fi
  if ((behind)); then
    printf '%d commit(s) on %s/main are not on HEAD: git pull --ff-only\n' "$behind" "$remote"
  fi
}

main() {
  local here remote=origin dry_run=0 force=0
  here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
  # shellcheck source=scripts/lib-release.sh
  source "$here/lib-release.sh"

  while (($#)); do
    case $1 in
      --yes | -y) ASSUME_YES=1 ;;
      --dry-run) dry_run=1 ;;
      --force-from-here) force=1 ;;
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

  # Count the tags others have pushed today too, so two releases never pick the same N; and main, to
  # compare HEAD with.
  step "Fetching tags and main from $remote"
  git fetch --quiet --tags "$remote" "+refs/heads/main:refs/remotes/$remote/main" </dev/null ||
    die "could not fetch tags and main from $remote"

  local problems=() forced=""
  mapfile -t problems < <(source_problems "$remote")
  if ((${#problems[@]})); then
    if ((!force)); then
      printf 'error: %s\n' "${problems[@]}" >&2
      die "release.sh releases only main as it is on $remote (--force-from-here overrides, for emergencies)"
    fi
    printf 'warning: %s\n' "${problems[@]}" >&2
    say "warning: releasing from here anyway (--force-from-here); the tag's message says so"
    forced=$(printf '%s; ' "${problems[@]}")
    forced=" (--force-from-here: ${forced%; })"
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

  git tag --annotate "$tag" --message "Release $tag$forced" HEAD
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
