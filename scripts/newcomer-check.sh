#!/usr/bin/env bash
# The newcomer's path, as CI tries it after `make test`: clone this checkout's HEAD into a temp
# folder, run `make demo` there on a small corpus, then run the commands that the README's Quick
# start gives after `make demo`, exactly as written, in a shell with no VECPIPE_* variable. Each
# must succeed and print results, and neither the demo nor they may print library noise. The
# clone's services are stopped and purged at the end, and the shared virtualenv (which `make demo`
# in the clone re-pointed at the clone) is pointed back at this checkout, on failure too.
#
#   scripts/newcomer-check.sh [--dir DIR] [--back CHECKOUT]
#
#   --dir DIR         try DIR as it is (uncommitted changes included) instead of a fresh clone
#   --back CHECKOUT   the checkout to point the virtualenv at afterwards (default: this one)
#   VECPIPE_DEMO_DOCS documents of the demo corpus (default here: 12)
set -euo pipefail

root="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)"
dir="" back="$root"
while (($#)); do
  case "$1" in
    --dir) dir="$(cd "$2" && pwd)"; shift 2 ;;
    --back) back="$(cd "$2" && pwd)"; shift 2 ;;
    *) echo "newcomer-check: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done

work="$(mktemp -d "${TMPDIR:-/tmp}/vecpipe-newcomer.XXXXXX")"
venv=""
cleanup() {
  local rc=$?
  if [[ -n "$venv" && -f "$dir/.vecpipe/services.json" && -x "$venv/bin/vecpipe" ]]; then
    "$venv/bin/vecpipe" services down --purge --home "$dir/.vecpipe" >/dev/null || rc=1
  fi
  # What `make install` does in $back, without its rule that could build another virtualenv.
  if [[ -n "$venv" && -x "$venv/bin/python" ]]; then
    "$venv/bin/python" -m pip install -qq --no-deps --no-build-isolation -e "$back" >/dev/null \
      || { echo "newcomer-check: could not point $venv back at $back" >&2; rc=1; }
  fi
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT

if [[ -z "$dir" ]]; then
  git clone -q "$root" "$work/vecpipe"
  dir="$work/vecpipe"
fi
venv="$(make -s --no-print-directory -C "$dir" venv-path)"
# A fresh clone's pyproject.toml is newer than the virtualenv's stamp, so make would reinstall
# (from the index) and delete the cache's other virtualenvs: the clone has the same dependencies.
if [[ -f "$venv/.installed" ]]; then touch -r "$venv/.installed" "$dir/pyproject.toml"; fi

fail() { echo "newcomer-check: $*" >&2; exit 1; }

# `make demo` would build a missing virtualenv and delete the cache's others (the one of a checkout
# with other dependencies): after `make test` the clone's is there, so refuse rather than do that.
if [[ ! -x "$venv/bin/python" ]] && compgen -G "$(dirname "$venv")/venv-*" >/dev/null; then
  venv=""
  fail "$dir's dependencies have no virtualenv yet; run this after \`make test\` in a checkout of them."
fi

# Library noise a newcomer must not see: setuptools' editable-install banners, librdkafka's log
# lines, raw (%<level>|<time>|<facility>|...) or passed on by vecpipe, such as its "Coordinator
# load in progress" retries, and tracebacks.
noise='BuildBackendWarning|Editable installation|setuptools/command|Coordinator load in progress|^%[0-7]\|[0-9.]+\||^librdkafka |"event": "librdkafka"|Traceback'
check_quiet() {  # what, log file
  if grep -Eq "$noise" "$2"; then
    grep -En "$noise" "$2" | head -5 >&2
    fail "$1 printed library noise (above)."
  fi
}

# A newcomer's shell: none of the variables a session of tests or a developer may have set.
while read -r name; do unset "$name"; done < <(compgen -e | grep '^VECPIPE_' | grep -v -e '^VECPIPE_DEMO_DOCS$' -e '^VECPIPE_CACHE$' || true)
export VECPIPE_DEMO_DOCS="${VECPIPE_DEMO_DOCS:-12}"
cd "$dir"

started=$SECONDS
echo "== make demo in $dir (VECPIPE_DEMO_DOCS=$VECPIPE_DEMO_DOCS)"
make demo >"$work/demo.log" 2>&1 || { tail -40 "$work/demo.log" >&2; fail "make demo failed."; }
check_quiet "make demo" "$work/demo.log"
grep -Eq '^ +1\. ' "$work/demo.log" || { cat "$work/demo.log" >&2; fail "make demo found nothing."; }
demo_s=$((SECONDS - started))

# The README's next commands: the bin/vecpipe lines of the Quick start's first code block.
mapfile -t commands < <(awk '
  /^## Quick start/ { section = 1; next }
  section && /^## / { exit }
  section && /^```/ { if (inblock) exit; inblock = 1; next }
  inblock && /^bin\/vecpipe / && !/services down/ { sub(/ +#.*/, ""); print }
' README.md)
((${#commands[@]} >= 3)) || fail "the README's Quick start gives ${#commands[@]} commands after make demo; expected search, status and dlq inspect."

for command in "${commands[@]}"; do
  echo "== $command"
  out="$work/command.log"
  bash -c "$command" >"$out" 2>&1 || { cat "$out" >&2; fail "\`$command\` failed."; }
  cat "$out"
  check_quiet "\`$command\`" "$out"
  case "$command" in
    *" search "*) grep -Eq '^ +1\. ' "$out" || fail "\`$command\` found nothing." ;;
    *" status"*) grep -Eq '^default +[1-9]' "$out" || fail "\`$command\` shows no rows." ;;
    *" dlq inspect "*) [[ -s "$out" ]] || fail "\`$command\` printed nothing." ;;
    *) [[ -s "$out" ]] || fail "\`$command\` printed nothing." ;;
  esac
done
echo "newcomer-check: make demo and the README's ${#commands[@]} next commands passed in" \
  "$((SECONDS - started)) s (make demo $demo_s s)."
