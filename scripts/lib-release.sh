# shellcheck shell=bash
# Shared by scripts/release.sh, deploy.sh and rollback.sh: prod tag naming and ordering, prompts, messages.
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

# The prod tag just before TAG in tag order (empty when TAG is the first).
prev_prod_tag() {
  local tag=$1
  { prod_tags; printf '%s\n' "$tag"; } | sort_prod_tags | uniq | grep -x -B1 -F "$tag" | grep -v -x -F "$tag" || true
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
