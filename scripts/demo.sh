#!/usr/bin/env bash
# make demo: local services -> migrate -> demo corpus -> produce -> embed -> write -> searches.
set -euo pipefail
export VECPIPE_HOME="${VECPIPE_HOME:-$PWD/.vecpipe}"
corpus="$VECPIPE_HOME/demo-corpus"

echo "== starting Kafka (KRaft) and PostgreSQL + pgvector in $VECPIPE_HOME"
vecpipe services up
eval "$(vecpipe services status --env | grep '^export ')"

echo "== migrating"
vecpipe migrate

echo "== writing the demo corpus (docstrings of the Python standard library)"
vecpipe demo-corpus "$corpus"

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
echo "Services keep running; stop them with: vecpipe services down (add --purge to drop the data)."
