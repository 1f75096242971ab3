#!/usr/bin/env bash
# make demo: local services -> migrate -> demo corpus -> produce -> embed -> write -> searches.
# VECPIPE_DEMO_DOCS=N takes only the first N documents of the corpus (CI's newcomer check).
set -euo pipefail
# The checkout's home, as bin/vecpipe uses (the commands after the demo find its services there).
export VECPIPE_HOME="${VECPIPE_HOME:-$PWD/.vecpipe}"
corpus="$VECPIPE_HOME/demo-corpus"

echo "== starting Kafka (KRaft) and PostgreSQL + pgvector in $VECPIPE_HOME"
vecpipe services up
# The demo talks to its own services, whatever addresses (or configuration file) the shell has.
unset VECPIPE_CONFIG
eval "$(vecpipe services status --env | grep '^export ')"

echo "== migrating"
vecpipe migrate

echo "== writing the demo corpus (docstrings of the Python standard library)"
rm -rf "$corpus"
vecpipe demo-corpus "$corpus" ${VECPIPE_DEMO_DOCS:+--limit "$VECPIPE_DEMO_DOCS"}

echo "== publishing chunks"
vecpipe produce "$corpus" --quiet

echo "== embedding (all-MiniLM-L6-v2, offline) until the chunks topic is drained"
vecpipe embed --until-idle 5 --log-format console 2>&1 | grep -E "model_loaded|worker_stopped|dead_lettered" || true

echo "== writing into pgvector until the embeddings topic is drained"
vecpipe write --until-idle 5 --log-format console 2>&1 | grep -E "worker_stopped|dead_lettered" || true

for q in "parse command line arguments" "read and write JSON files" \
         "compress data with gzip" "run a function in a separate thread"; do
  echo
  vecpipe search "$q" -k 3
done
echo
echo "Services keep running. Next, from this checkout:"
echo "  bin/vecpipe search \"parse command line arguments\" -k 3"
echo "  bin/vecpipe status                  # lag per stage, dead letters, rows, indexes"
echo "  bin/vecpipe dlq inspect chunks      # what could not be processed"
echo "  bin/vecpipe services down           # stop them (--purge drops the data)"
