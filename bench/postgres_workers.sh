#!/usr/bin/env bash
# Integration check (not in `make test`): two search workers share one study on a real PostgreSQL
# server started here from Debian's postgresql package. Run with `make test-postgres` (needs root).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
command -v pg_ctlcluster >/dev/null || { apt-get update -qq && apt-get install -y -qq postgresql >/dev/null; }
$BIN/python -m pip install --quiet psycopg2-binary
VER=$(ls /usr/lib/postgresql | sort -n | tail -1)
PGDIR=$(mktemp -d)
chown postgres "$PGDIR"
su postgres -c "/usr/lib/postgresql/$VER/bin/initdb -D $PGDIR/data -A trust" >/dev/null
su postgres -c "/usr/lib/postgresql/$VER/bin/pg_ctl -D $PGDIR/data -o '-p 54329 -k $PGDIR' -l $PGDIR/log start" >/dev/null
trap 'su postgres -c "/usr/lib/postgresql/$VER/bin/pg_ctl -D $PGDIR/data stop" >/dev/null; rm -rf "$PGDIR"' EXIT
sleep 2
su postgres -c "psql -h $PGDIR -p 54329 -c 'create database refusal_lab'" >/dev/null
URL="postgresql+psycopg2://postgres@127.0.0.1:54329/refusal_lab"  # SQLAlchemy 2.1 defaults to psycopg 3
OUT=$(mktemp -d)
ARGS=(search organism --storage "$URL" --study-name pg --methods kernel --eval-count 6 --max-new-tokens 12)
$BIN/refusal-lab "${ARGS[@]}" --trials 1 -o "$OUT/w0" >/dev/null
$BIN/refusal-lab "${ARGS[@]}" --trials 12 -o "$OUT/w1" >/dev/null &
$BIN/refusal-lab "${ARGS[@]}" --trials 12 -o "$OUT/w2" >/dev/null &
wait
$BIN/python - "$URL" <<'PY'
import sys, optuna
study = optuna.load_study(study_name="pg", storage=sys.argv[1])
done = [t for t in study.trials if t.state.is_finished()]
workers = {t.user_attrs.get("worker") for t in done[1:]}
print(f"postgres study: {len(done)} finished trials from {len(workers)} workers")
assert len(done) >= 12 and len(workers) == 2
PY
