#!/usr/bin/env bash
# fraudstream: stop what setup.sh started and delete the project's generated state.
#
# Deletes exactly: run/ (checkpoints, logs, PID files, metrics, the default verdict database
# run/verdicts.db), models/ (the trained model versions) and the contents of
# parquet_data/ except parquet_data/.gitkeep. Local services are stopped through setup.sh's own
# PID files (never by process name). When a Docker engine answers, the compose project
# "fraudstream" is taken down with its volumes (the `models` volume among them); no other
# container, image or volume is touched.
set -euo pipefail

ROOT="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)"
cd "$ROOT"

readonly PROJECT=fraudstream

usage() {
  cat <<'EOF'
Usage: ./reset.sh [--yes]

Stops the fraudstream services started by ./setup.sh and deletes the generated state:
  run/                     checkpoints, logs, PID files, metrics, and the analysts' verdicts
                           in the default database run/verdicts.db (a VERDICTS_URL server
                           is not touched)
  models/                  the trained model versions (a MODELS_DIR elsewhere is not touched)
  parquet_data/*           alerts and other datasets (parquet_data/.gitkeep is kept)
  Docker (if an engine answers): docker compose -p fraudstream down --volumes --remove-orphans
  (only this project's containers, network and named volumes, the trained models in the
  volume `models` included; images are kept)
Nothing else is deleted (.venv and your files stay).

  -y, --yes    do not ask for confirmation (required when stdin is not a terminal)
EOF
}

die() { printf 'reset.sh: error: %s\n' "$*" >&2; exit 1; }
have() { command -v "$1" >/dev/null 2>&1; }

# The script deletes relative paths, so it must be sitting in the fraudstream checkout.
if ! [[ -f pyproject.toml && -f setup.sh && -f docker-compose.yml && -d fraudstream ]] ||
  ! grep -q '^name = "fraudstream"' pyproject.toml; then
  die "$ROOT is not the fraudstream repository; refusing to delete anything"
fi

YES=0
while (($#)); do
  case "$1" in
    -y | --yes) YES=1 ;;
    -h | --help) usage; exit 0 ;;
    *) printf 'reset.sh: unknown argument %s (see ./reset.sh --help)\n' "$1" >&2; exit 2 ;;
  esac
  shift
done

docker_engine_up() {
  have docker || return 1
  if have timeout; then
    timeout 20 docker info >/dev/null 2>&1
  else
    docker info >/dev/null 2>&1
  fi
}

COMPOSE=()
if docker_engine_up; then
  if docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
  elif have docker-compose; then
    COMPOSE=(docker-compose)
  fi
fi

echo "This will, in $ROOT:"
echo "  - stop the local services started by ./setup.sh (from run/pids/)"
if ((${#COMPOSE[@]})); then
  echo "  - run: ${COMPOSE[*]} -p $PROJECT down --volumes --remove-orphans"
fi
echo "  - delete run/, models/ and everything in parquet_data/ except .gitkeep"

if ((!YES)); then
  if [[ ! -t 0 ]]; then
    die "stdin is not a terminal; pass --yes to confirm"
  fi
  read -r -p "Continue? [y/N] " answer
  case "$answer" in
    y | Y | yes | YES) ;;
    *) echo "Nothing done."; exit 1 ;;
  esac
fi

./setup.sh --local stop

if ((${#COMPOSE[@]})); then
  "${COMPOSE[@]}" -p "$PROJECT" -f "$ROOT/docker-compose.yml" --profile cluster \
    --profile trainer down --volumes --remove-orphans
fi

failed=0
rm -rf -- run || failed=1
# A symlink named models is removed itself, never what it points to.
rm -rf -- models || failed=1
if [[ -d parquet_data ]]; then
  find parquet_data -mindepth 1 -maxdepth 1 ! -name .gitkeep -exec rm -rf -- {} + || failed=1
fi
mkdir -p parquet_data
[[ -e parquet_data/.gitkeep ]] || : >parquet_data/.gitkeep
if ((failed)); then
  die "some files could not be deleted (owned by another user? e.g. written by a container); \
delete them with the owner's rights"
fi
echo "==> reset done: run/ and models/ removed, parquet_data/ emptied (kept .gitkeep)"
