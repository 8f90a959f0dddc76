# shellcheck shell=bash
# Shared by scripts/release.sh, deploy.sh and rollback.sh: prod tag naming and ordering, the deploy history
# of a checkout, prompts, messages.
# Production runs only immutable annotated tags named prod-YYYY-MM-DD-N (N = 1, 2, … within a day).

PROD_TAG_RE='^prod-[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])-[1-9][0-9]*$'

# Set to 1 by --yes: every confirmation is answered "y" without reading stdin.
ASSUME_YES=${ASSUME_YES:-0}

say() { printf '%s\n' "$*" >&2; }
step() { printf '\n==> %s\n' "$*" >&2; }
die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}

is_prod_tag() { [[ $1 =~ $PROD_TAG_RE ]]; }

# Prod tags read from stdin, oldest first: by date, then by N as a number (…-9 before …-10).
sort_prod_tags() {
  grep -E "$PROD_TAG_RE" | sort -t- -k2,2n -k3,3n -k4,4n -k5,5n || true
}

# Every prod tag of the repository in the current directory, oldest first.
prod_tags() { git tag --list 'prod-*' | sort_prod_tags; }

# The tag after the existing ones of DATE (YYYY-MM-DD): prod-DATE-1 when there is none.
next_prod_tag() {
  local date=$1 last n
  last=$(git tag --list "prod-$date-*" | sort_prod_tags | tail -n 1)
  if [[ -z $last ]]; then
    n=1
  else
    n=$((${last##*-} + 1))
  fi
  printf 'prod-%s-%d\n' "$date" "$n"
}

# The newest prod tag pointing at HEAD (empty when HEAD carries none).
head_prod_tag() { git tag --points-at HEAD | sort_prod_tags | tail -n 1; }

# confirm QUESTION: 0 for "y"/"yes", 1 otherwise (also on end of input). --yes answers for the operator.
confirm() {
  local answer=""
  if [[ $ASSUME_YES == 1 ]]; then
    printf '%s [y/N] y (--yes)\n' "$1" >&2
    return 0
  fi
  printf '%s [y/N] ' "$1" >&2
  read -r answer || answer=""
  [[ $answer =~ ^[Yy]([Ee][Ss])?$ ]]
}

# ---------------------------------------------------------------- deploy history
# Each checkout records what deploy.sh did to it in .git/sidecar-deploys: inside the repository's own
# directory, so it is never in `git status`, survives every checkout, and is writable by whoever may
# deploy. Append-only, one tab-separated line per event (a `#` line is a comment):
#   TIME (UTC)  EVENT  NAME  COMMIT  DETAIL
#   deploy | rollback   a change to NAME (the tag, branch or commit asked for) begins; DETAIL "from <commit>"
#   verified | failed   how that change ended (every checkpoint passed / DETAIL says which did not)
#   found               HEAD at the start of a change when the history did not end there (the first deploy
#                       with this script, or a checkout by hand): it was running, though nothing verified it
# A change with neither verified nor failed after it was interrupted: it counts as not verified.
#
# Rollbacks follow the line of releases that verified, a stack: a verified deploy (or a found release) is
# pushed; a verified rollback to X goes back down to X, or, when X is not on the line, replaces the release
# it left. So -1 -> -3 rolls back to -1 (not -2, which never ran here), a second rollback goes on to what
# ran before -1 (not forward to -3), and a release that failed is never pushed. A commit whose latest
# attempt failed is skipped even when it once verified.

HISTORY_HEADER='# Deploy history of this checkout, appended by scripts/deploy.sh (see scripts/lib-release.sh).
# TIME (UTC)	EVENT	NAME	COMMIT	DETAIL'

# The history file of the checkout in the current directory.
history_file() { git rev-parse --git-path sidecar-deploys; }

# history_add EVENT NAME COMMIT [DETAIL]: append one line (tabs and newlines in DETAIL become spaces).
history_add() {
  local file detail=${4:-}
  file=$(history_file)
  [[ -s $file ]] || printf '%s\n' "$HISTORY_HEADER" >>"$file"
  detail=${detail//[$'\t\n']/ }
  printf '%s\t%s\t%s\t%s\t%s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$1" "$2" "$3" "$detail" >>"$file"
}

# The commit of the history's last line (empty without a history).
history_last_commit() {
  local file
  file=$(history_file)
  [[ -f $file ]] || return 0
  awk -F'\t' '!/^#/ && NF >= 4 { c = $4 } END { if (c != "") print c }' "$file"
}

# The releases a rollback may go to, best first, one "NAME<TAB>COMMIT<TAB>TIME<TAB>verified|found" per
# line: the line of verified releases (see above), newest first, without EXCLUDE (a commit) and without
# commits whose latest attempt failed.
history_candidates() {
  local exclude=$1 file
  file=$(history_file)
  [[ -f $file ]] || return 0
  awk -F'\t' -v exclude="$exclude" '
    function push(how) { n++; names[n] = $3; commits[n] = $4; times[n] = $1; hows[n] = how }
    /^#/ || NF < 4 { next }
    $2 == "found" { push("found"); latest[$4] = "found"; next }
    $2 == "deploy" || $2 == "rollback" { mode = $2; from = $5; sub(/^from /, "", from); next }
    $2 == "failed" { latest[$4] = "failed"; next }
    $2 == "verified" {
      latest[$4] = "verified"
      if (mode == "rollback") {
        for (k = n; k > 0 && commits[k] != $4; k--) {}
        if (k > 0) { n = k; next }          # back down the line to the release rolled back to
        while (n > 0 && commits[n] == from) n--   # off the line: it replaces the release it left
      }
      push("verified")
    }
    END {
      for (k = n; k > 0; k--)
        if (commits[k] != exclude && latest[commits[k]] != "failed")
          printf "%s\t%s\t%s\t%s\n", names[k], commits[k], times[k], hows[k]
    }' "$file"
}

# history_rollback_target EXCLUDE PROD_ONLY: the first candidate as "REF<TAB>COMMIT<TAB>TIME<TAB>HOW", REF
# being its tag when NAME is a tag still on that commit, else the commit. PROD_ONLY=1 keeps prod tags only.
history_rollback_target() {
  local exclude=$1 prod_only=$2 name commit time how
  while IFS=$'\t' read -r name commit time how; do
    if [[ $(git rev-parse --verify --quiet "refs/tags/$name^{commit}") == "$commit" ]]; then
      if ((prod_only)) && ! is_prod_tag "$name"; then continue; fi
      printf '%s\t%s\t%s\t%s\n' "$name" "$commit" "$time" "$how"
      return 0
    fi
    ((prod_only)) && continue
    printf '%s\t%s\t%s\t%s\n' "$commit" "$commit" "$time" "$how"
    return 0
  done < <(history_candidates "$exclude")
}

# show_changes FROM_COMMIT TO_COMMIT: the commits a move from one to the other adds and removes.
show_changes() {
  local from=$1 to=$2 added removed
  added=$(git --no-pager log --oneline --no-decorate -n 50 "$from..$to")
  removed=$(git --no-pager log --oneline --no-decorate -n 50 "$to..$from")
  if [[ -z $added && -z $removed ]]; then
    say "Commits: none (the same commit)"
    return
  fi
  if [[ -n $added ]]; then
    say "Commits being added:"
    say "$added"
  fi
  if [[ -n $removed ]]; then
    say "Commits being removed:"
    say "$removed"
  fi
}
