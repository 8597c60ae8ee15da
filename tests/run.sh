#!/usr/bin/env bash
# The README's test command: installs what the suite needs on a fresh machine, then runs pytest.
# Extra arguments go to pytest (e.g. `bash tests/run.sh -m unit`).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v java >/dev/null 2>&1 || missing+=(openjdk-17-jre-headless)
command -v shellcheck >/dev/null 2>&1 || missing+=(shellcheck)
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
[ -x /usr/bin/chromium ] || missing+=(chromium)
# A real PostgreSQL server for the verdict store's tests (they start their own cluster).
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
if ((${#missing[@]})); then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "tests/run.sh: installing system packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "tests/run.sh: missing system packages (${missing[*]}); install them as root or" \
         "the tests that need them fail under CI and skip elsewhere" >&2
  fi
fi

PYTHON=${PYTHON:-python3}
echo "tests/run.sh: installing the project with its dev and browser extras"
"$PYTHON" -m pip install --quiet --disable-pip-version-check -e ".[dev,browser]"

echo "tests/run.sh: ruff check"
"$PYTHON" -m ruff check --quiet .

export SPARK_LOCAL_IP=127.0.0.1
# Parallel workers (TEST_WORKERS, 0 for none), each with its own broker and Spark session; a
# module's tests stay on one worker, so its module-scoped fixtures start once. A later `-n`
# among the arguments wins.
exec "$PYTHON" -m pytest -n "${TEST_WORKERS:-2}" --dist loadscope "$@"
