#!/usr/bin/env bash
# fraudstream: start, inspect and stop the whole pipeline.
#
# Docker mode (when `docker info` answers and docker compose v2 or docker-compose v1 exists):
# builds and starts docker-compose.yml as project "fraudstream". Local mode (otherwise, or with
# --local): a virtualenv in .venv, the embedded Kafka-protocol broker and the services as
# background processes, each in its own process group, with logs and PID files under run/.
# Run `./setup.sh --help` for the commands and the environment variables it honours.
set -euo pipefail

ROOT="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)"
cd "$ROOT"

readonly PROJECT=fraudstream
readonly RUN_DIR="run"
readonly LOG_DIR="$RUN_DIR/logs"
readonly PID_DIR="$RUN_DIR/pids"
readonly MODE_FILE="$RUN_DIR/mode"
readonly LOCAL_ENV_FILE="$RUN_DIR/local.env"
readonly INSTALL_STAMP="$RUN_DIR/install.stamp"
readonly VENV_DIR=".venv"
# Start order; stop runs it backwards.
readonly ALL_SERVICES="broker producer detector dashboard"
readonly BROKER_HOST=127.0.0.1
readonly STOP_TIMEOUT="${FRAUDSTREAM_STOP_TIMEOUT:-20}"
readonly BROKER_TIMEOUT="${FRAUDSTREAM_BROKER_TIMEOUT:-60}"
readonly HEALTH_TIMEOUT="${FRAUDSTREAM_HEALTH_TIMEOUT:-240}"

MODE=""        # docker | local | "" (auto)
ACTION="start"
CLUSTER=0
FOLLOW=1
LOG_SERVICE=""
PY=""
COMPOSE=()

usage() {
  cat <<'EOF'
Usage: ./setup.sh [--docker | --local] [--cluster] [COMMAND]

Commands:
  start (default)   build/install and start the pipeline, wait until it answers, print URLs
  status            show each service: running (pid, uptime) / stopped / crashed (last log
                    lines), and whether the broker answers
  stop              stop the local services (SIGTERM, then SIGKILL after ~20 s); in Docker
                    mode also `docker compose down` (volumes are kept; ./reset.sh removes them)
  logs [SERVICE]    follow the logs (local: run/logs/SERVICE.log; Docker: compose logs -f);
                    add --no-follow to print the last lines and exit

Mode (default: Docker when `docker info` succeeds and compose is installed, else local):
  --docker          Docker Compose: Kafka (KRaft), producer, Spark detector, consumer,
                    Streamlit dashboard on http://localhost:8501, Kafdrop on http://localhost:9000
  --local           plain processes: embedded broker, producer, detector, dashboard
  --cluster         Docker mode only: also start the Spark standalone master and two workers
                    and run the detector on them (profile `cluster`)

Local mode environment:
  BROKER_PORT=9092             port of the embedded broker on 127.0.0.1
  FRAUDSTREAM_SERVICES="broker producer detector dashboard"
                               the subset to start (in that order)
  FRAUDSTREAM_PYTHON=/path     use this interpreter as is: no .venv, no `pip install`
  STREAMLIT_SERVER_PORT=8501   dashboard port (bound to 127.0.0.1)
  Every service setting (PRODUCER_RATE, PARQUET_DIR, CHECKPOINT_DIR, ...) is passed through;
  see `python -m producer --help` and friends.

Watch the alerts:
  local:  KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9092 .venv/bin/python -m consumer
  Docker: docker compose -p fraudstream logs -f consumer   (or ./setup.sh logs consumer)
EOF
}

info() { printf '==> %s\n' "$*"; }
warn() { printf 'setup.sh: warning: %s\n' "$*" >&2; }
die() { printf 'setup.sh: error: %s\n' "$*" >&2; exit 1; }
usage_error() { printf 'setup.sh: %s (see ./setup.sh --help)\n' "$*" >&2; exit 2; }
have() { command -v "$1" >/dev/null 2>&1; }

# --- Docker ---------------------------------------------------------------------------------------

docker_engine_up() {
  have docker || return 1
  if have timeout; then
    timeout 20 docker info >/dev/null 2>&1
  else
    docker info >/dev/null 2>&1
  fi
}

# Sets COMPOSE to the compose command line for this project; fails if no compose is installed.
find_compose() {
  if have docker && docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
  elif have docker-compose; then
    COMPOSE=(docker-compose)
  else
    return 1
  fi
  COMPOSE+=(-p "$PROJECT" -f "$ROOT/docker-compose.yml")
}

compose_display() {
  if [[ "${COMPOSE[0]}" == docker-compose ]]; then
    printf 'docker-compose -p %s' "$PROJECT"
  else
    printf 'docker compose -p %s' "$PROJECT"
  fi
}

compose_service_name() {
  case "$1" in
    detector) echo spark_job ;;
    *) echo "$1" ;;
  esac
}

# Echoes the health (or, without a healthcheck, the state and exit code) of a compose service.
container_state() {
  local cid
  cid="$("${COMPOSE[@]}" --profile cluster ps -a -q "$1" 2>/dev/null | head -n 1)"
  [[ -n "$cid" ]] || { echo missing; return 0; }
  docker inspect -f \
    '{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}} {{.State.ExitCode}}{{end}}' \
    "$cid" 2>/dev/null || echo missing
}

wait_for_container() {
  local svc=$1 want=$2 deadline state
  deadline=$((SECONDS + HEALTH_TIMEOUT))
  info "waiting for $svc to be $want ..."
  while ((SECONDS < deadline)); do
    state="$(container_state "$svc")"
    case "$state" in
      "$want") return 0 ;;
      unhealthy | "exited "[1-9]* | "dead "*)
        "${COMPOSE[@]}" --profile cluster logs --tail=30 "$svc" >&2 || true
        die "$svc is $state (its last log lines are above)"
        ;;
    esac
    sleep 2
  done
  "${COMPOSE[@]}" --profile cluster logs --tail=30 "$svc" >&2 || true
  die "$svc is still '$state' after ${HEALTH_TIMEOUT}s"
}

start_docker() {
  find_compose || die "a Docker engine answers but neither 'docker compose' (v2) nor \
'docker-compose' (v1) is installed; install one (Debian/Ubuntu: sudo apt-get install \
docker-compose) or run ./setup.sh --local"
  mkdir -p "$RUN_DIR" parquet_data
  echo docker >"$MODE_FILE"
  # Build the images with the caller's uid/gid so files in the bind-mounted parquet_data/
  # belong to them (root keeps the image's default unprivileged user).
  if [[ "$(id -u)" != 0 ]]; then
    FRAUDSTREAM_UID="$(id -u)"
    FRAUDSTREAM_GID="$(id -g)"
    export FRAUDSTREAM_UID FRAUDSTREAM_GID
  fi
  local up=(up -d --build) profile=()
  if ((CLUSTER)); then
    profile=(--profile cluster)
    up+=(--scale spark_job=0)
  fi
  info "Docker mode: building and starting project '$PROJECT' with $(compose_display)"
  "${COMPOSE[@]}" ${profile[@]+"${profile[@]}"} "${up[@]}"
  wait_for_container kafka healthy
  wait_for_container kafka-init "exited 0"
  wait_for_container dashboard healthy
  if ((CLUSTER)); then
    wait_for_container spark-master healthy
  fi
  cat <<EOF

fraudstream is running in Docker (project '$PROJECT'):
  Dashboard (Streamlit)   http://localhost:8501
  Kafdrop (Kafka UI)      http://localhost:9000
EOF
  if ((CLUSTER)); then
    echo "  Spark master UI         http://localhost:8080"
    echo "  Spark UI (detector)     http://localhost:4041"
  fi
  cat <<EOF
  Kafka for host tools    localhost:9092 (inside the stack: kafka:29092)
  Parquet alerts          ./parquet_data/alerts/
Watch alerts:   $(compose_display) logs -f consumer     (or ./setup.sh logs consumer)
Status:         ./setup.sh status      Stop: ./setup.sh stop      Reset: ./reset.sh
EOF
}

stop_docker() {
  find_compose || die "no docker compose / docker-compose to stop the Docker stack with"
  if ! docker_engine_up; then
    warn "the Docker engine does not answer; no Docker stack to stop"
    return 0
  fi
  info "stopping the Docker stack (project '$PROJECT'; volumes are kept)"
  "${COMPOSE[@]}" --profile cluster down
}

status_docker() {
  find_compose || die "no docker compose / docker-compose found"
  "${COMPOSE[@]}" --profile cluster ps
}

logs_docker() {
  find_compose || die "no docker compose / docker-compose found"
  local args=(logs --tail=100)
  ((FOLLOW)) && args+=(-f)
  if [[ -n "$LOG_SERVICE" ]]; then
    args+=("$(compose_service_name "$LOG_SERVICE")")
  fi
  exec "${COMPOSE[@]}" --profile cluster "${args[@]}"
}

# --- local mode: services ---------------------------------------------------------------------------

service_module() {
  case "$1" in
    broker) echo fraudstream.broker ;;
    producer) echo producer ;;
    detector) echo spark_job ;;
    dashboard) echo dashboard ;;
    *) return 1 ;;
  esac
}

# A service can run once its package has an entry point (they are written independently).
service_available() {
  case "$1" in
    broker) [[ -f fraudstream/broker.py ]] ;;
    *) [[ -f "$(service_module "$1")/__main__.py" ]] ;;
  esac
}

normalize_service() {
  case "$1" in
    spark_job | spark-job) echo detector ;;
    broker | producer | detector | dashboard) echo "$1" ;;
    *) return 1 ;;
  esac
}

pid_file() { echo "$PID_DIR/$1.pid"; }
log_file() { echo "$LOG_DIR/$1.log"; }

read_pid() {
  local file pid
  file="$(pid_file "$1")"
  [[ -f "$file" ]] || return 1
  pid="$(head -n 1 "$file" 2>/dev/null || true)"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  echo "$pid"
}

# Prints the pid if the service's PID file names a live process running that service's module
# (or a program started from this checkout's package folder: `python -m dashboard` replaces
# itself with `streamlit run <repo>/dashboard/app.py`); a dead or recycled pid does not count.
service_pid() {
  local pid cmd module
  pid="$(read_pid "$1")" || return 1
  pid_alive "$pid" || return 1
  cmd="$(ps -ww -o args= -p "$pid" 2>/dev/null || true)"
  module="$(service_module "$1")"
  [[ " $cmd " == *" -m $module "* || "$cmd" == *" $ROOT/${module%%.*}/"* ]] || return 1
  echo "$pid"
}

# Zombies count as dead: a reparented service may never be reaped inside a container.
pid_alive() {
  local state
  state="$(ps -o stat= -p "$1" 2>/dev/null | tr -d ' ')" || return 1
  [[ -n "$state" && "$state" != Z* ]]
}

group_alive() {
  ps -A -o pgid=,stat= | awk -v g="$1" '$1 == g && $2 !~ /^Z/ {found = 1} END {exit !found}'
}

uptime_of() { ps -o etime= -p "$1" 2>/dev/null | tr -d ' '; }

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

# All descendants of a pid (children first-level, then theirs), for processes that left the
# service's process group (the broker runs tansu in its own session).
descendants_of() {
  local all frontier next pid
  all=""
  frontier="$1"
  while [[ -n "$frontier" ]]; do
    next=""
    for pid in $frontier; do
      next="$next $(ps -A -o pid=,ppid= | awk -v p="$pid" '$2 == p {print $1}' | tr '\n' ' ')"
    done
    next="$(echo "$next" | xargs)"
    all="$all $next"
    frontier="$next"
  done
  echo "$all" | xargs
}

any_alive() {
  local pid
  for pid in "$@"; do
    pid_alive "$pid" && return 0
  done
  return 1
}

launch() {
  local svc=$1 module log pid
  module="$(service_module "$svc")"
  log="$(log_file "$svc")"
  printf '\n===== %s: starting %s (%s -m %s) =====\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    "$svc" "$PY" "$module" >>"$log"
  # setsid makes the service a session and process-group leader, so stop can signal the whole
  # group (Spark's JVM, Streamlit's children). Without util-linux (macOS), Python does the same.
  if have setsid; then
    setsid "$PY" -m "$module" >>"$log" 2>&1 </dev/null &
  else
    "$PY" -c 'import os, sys; os.setsid(); os.execvp(sys.argv[1], sys.argv[1:])' \
      "$PY" -m "$module" >>"$log" 2>&1 </dev/null &
  fi
  pid=$!
  echo "$pid" >"$(pid_file "$svc")"
  info "started $svc (pid $pid, log $log)"
}

show_log_tail() {
  local log
  log="$(log_file "$1")"
  if [[ -s "$log" ]]; then
    tail -n "${2:-15}" "$log" | sed 's/^/      | /'
  fi
}

wait_for_local_broker() {
  local pid=$1 rc=0
  info "waiting for the broker on $BROKER_HOST:$BROKER_PORT and its topics ..."
  "$PY" - "$BROKER_HOST:$BROKER_PORT" "$pid" "$BROKER_TIMEOUT" <<'PYEOF' || rc=$?
import os
import sys
import time

from confluent_kafka.admin import AdminClient

from fraudstream import topics

address, pid, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
wanted = {topics.TRANSACTIONS, topics.ALERTS, topics.DLQ}
admin = AdminClient({"bootstrap.servers": address, "log_level": 0})
deadline = time.monotonic() + timeout
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit(3)
    try:
        if wanted <= set(admin.list_topics(timeout=1.0).topics):
            sys.exit(0)
    except Exception:
        pass
    time.sleep(0.2)
sys.exit(4)
PYEOF
  case "$rc" in
    0) return 0 ;;
    3) show_log_tail broker >&2; die "the broker exited while starting (log: $(log_file broker))" ;;
    *) show_log_tail broker >&2; die "the broker did not answer on $BROKER_HOST:$BROKER_PORT within ${BROKER_TIMEOUT}s" ;;
  esac
}

wait_for_dashboard() {
  local url="http://$STREAMLIT_SERVER_ADDRESS:$STREAMLIT_SERVER_PORT/_stcore/health"
  info "waiting for the dashboard at $url ..."
  if "$PY" - "$url" "$HEALTH_TIMEOUT" "$(read_pid dashboard)" <<'PYEOF'; then
import os
import sys
import time
import urllib.request

url, timeout, pid = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
deadline = time.monotonic() + timeout
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit(3)
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            if response.status == 200:
                sys.exit(0)
    except OSError:
        pass
    time.sleep(0.5)
sys.exit(4)
PYEOF
    return 0
  fi
  warn "the dashboard did not answer yet; see ./setup.sh status and $(log_file dashboard)"
}

# --- local mode: Python and Java --------------------------------------------------------------------

find_base_python() {
  local candidate
  for candidate in python3.11 python3.12 python3.13 python3 python; do
    if have "$candidate" &&
      "$candidate" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
      command -v "$candidate"
      return 0
    fi
  done
  return 1
}

file_digest() {
  "$PY" -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$1"
}

setup_python() {
  if [[ -n "${FRAUDSTREAM_PYTHON:-}" ]]; then
    PY="$FRAUDSTREAM_PYTHON"
    "$PY" -c 'import fraudstream' 2>/dev/null ||
      die "FRAUDSTREAM_PYTHON=$PY cannot import fraudstream (run 'pip install -e .' with it)"
    info "using FRAUDSTREAM_PYTHON=$PY as is (no virtualenv, no install)"
    return 0
  fi
  if [[ ! -x "$VENV_DIR/bin/python" ]]; then
    local base
    base="$(find_base_python)" || die "Python 3.11 or newer is required (Debian/Ubuntu: sudo \
apt-get install python3 python3-venv)"
    info "creating the virtualenv $VENV_DIR with $base"
    "$base" -m venv "$VENV_DIR" || die "could not create $VENV_DIR (Debian/Ubuntu: sudo \
apt-get install python3-venv)"
  else
    info "reusing the virtualenv $VENV_DIR"
  fi
  PY="$ROOT/$VENV_DIR/bin/python"
  local digest
  digest="$(file_digest pyproject.toml)"
  if [[ -f "$INSTALL_STAMP" && "$(cat "$INSTALL_STAMP")" == "$digest" ]] &&
    "$PY" -c 'import fraudstream, pyspark, confluent_kafka, streamlit' 2>/dev/null; then
    info "dependencies are up to date (pyproject.toml unchanged since the last install)"
    return 0
  fi
  local install_log="$LOG_DIR/pip-install.log" pid started
  info "installing fraudstream and its dependencies into $VENV_DIR (pip install -e .)"
  info "the first install downloads ~500 MB (pyspark, pyarrow, pandas, streamlit): a few minutes"
  "$PY" -m pip install --disable-pip-version-check --progress-bar off -e . >"$install_log" 2>&1 &
  pid=$!
  started=$SECONDS
  while kill -0 "$pid" 2>/dev/null; do
    sleep 1
    if (((SECONDS - started) % 20 == 0)); then
      info "  still installing ($((SECONDS - started)) s; details in $install_log)"
    fi
  done
  if ! wait "$pid"; then
    tail -n 20 "$install_log" >&2
    die "pip install -e . failed (full log: $install_log)"
  fi
  echo "$digest" >"$INSTALL_STAMP"
  info "installed in $((SECONDS - started)) s"
}

java_instructions() {
  cat >&2 <<'EOF'
The detector (PySpark 4) needs Java 17 or newer.
  Debian/Ubuntu:  sudo apt-get install -y openjdk-17-jre-headless
                  export JAVA_HOME=/usr/lib/jvm/java-17-openjdk-amd64   (arm64: ...-arm64)
  macOS:          brew install openjdk@17 && export JAVA_HOME="$(/usr/libexec/java_home -v 17)"
Then run ./setup.sh again, or start without the detector:
  FRAUDSTREAM_SERVICES="broker producer dashboard" ./setup.sh --local
EOF
}

check_java() {
  local java_bin="" line version major
  if [[ -n "${JAVA_HOME:-}" && -x "$JAVA_HOME/bin/java" ]]; then
    java_bin="$JAVA_HOME/bin/java"
  elif have java; then
    java_bin="$(command -v java)"
  fi
  if [[ -z "$java_bin" ]]; then
    printf 'setup.sh: error: no Java runtime found (java is not on PATH and JAVA_HOME is %s).\n' \
      "${JAVA_HOME:-unset}" >&2
    java_instructions
    exit 1
  fi
  line="$("$java_bin" -version 2>&1 | grep -m 1 -i 'version' || true)"
  version="$(printf '%s\n' "$line" | sed -n 's/.*version "\([^"]*\)".*/\1/p')"
  if [[ "$version" == 1.* ]]; then
    major="$(printf '%s' "$version" | cut -d. -f2)"
  else
    major="$(printf '%s' "$version" | sed 's/[^0-9].*//')"
  fi
  if ! [[ "$major" =~ ^[0-9]+$ ]] || ((major < 17)); then
    printf 'setup.sh: error: %s is Java %s; Java 17 or newer is required.\n' "$java_bin" \
      "${version:-of unknown version}" >&2
    java_instructions
    exit 1
  fi
  info "Java $version ($java_bin)"
}

# --- local mode: commands ---------------------------------------------------------------------------

selected_services() {
  local wanted="${FRAUDSTREAM_SERVICES:-$ALL_SERVICES}" svc normalized out=""
  for svc in $wanted; do
    normalized="$(normalize_service "$svc")" ||
      usage_error "unknown service '$svc' in FRAUDSTREAM_SERVICES (known: $ALL_SERVICES)"
    out="$out $normalized"
  done
  # Keep the canonical start order whatever order the user wrote.
  local ordered=""
  for svc in $ALL_SERVICES; do
    [[ " $out " == *" $svc "* ]] && ordered="$ordered $svc"
  done
  echo "$ordered" | xargs
}

load_local_env() {
  # What the last start used, so status/stop look at the same broker.
  if [[ -z "${BROKER_PORT:-}" && -f "$LOCAL_ENV_FILE" ]]; then
    BROKER_PORT="$(sed -n 's/^BROKER_PORT=\([0-9]*\)$/\1/p' "$LOCAL_ENV_FILE")"
  fi
  BROKER_PORT="${BROKER_PORT:-9092}"
}

start_local() {
  mkdir -p "$LOG_DIR" "$PID_DIR"
  echo local >"$MODE_FILE"
  local services svc pid started=""
  services="$(selected_services)"
  [[ -n "$services" ]] || usage_error "FRAUDSTREAM_SERVICES selects no service"
  BROKER_PORT="${BROKER_PORT:-9092}"
  [[ "$BROKER_PORT" =~ ^[0-9]+$ ]] || usage_error "BROKER_PORT must be a number, got '$BROKER_PORT'"
  info "local mode (run folder: $RUN_DIR/; services: $services)"

  setup_python

  export BROKER_HOST BROKER_PORT
  if [[ " $services " == *" broker "* ]]; then
    export KAFKA_BOOTSTRAP_SERVERS="$BROKER_HOST:$BROKER_PORT"
  else
    export KAFKA_BOOTSTRAP_SERVERS="${KAFKA_BOOTSTRAP_SERVERS:-$BROKER_HOST:$BROKER_PORT}"
  fi
  export PARQUET_DIR="${PARQUET_DIR:-parquet_data}"
  export CHECKPOINT_DIR="${CHECKPOINT_DIR:-$RUN_DIR/checkpoint}"
  export SPARK_LOCAL_IP="${SPARK_LOCAL_IP:-127.0.0.1}"
  export STREAMLIT_SERVER_ADDRESS="${STREAMLIT_SERVER_ADDRESS:-127.0.0.1}"
  export STREAMLIT_SERVER_PORT="${STREAMLIT_SERVER_PORT:-8501}"
  export STREAMLIT_SERVER_HEADLESS=true
  export STREAMLIT_BROWSER_GATHER_USAGE_STATS=false
  printf 'BROKER_PORT=%s\nKAFKA_BOOTSTRAP_SERVERS=%s\n' "$BROKER_PORT" \
    "$KAFKA_BOOTSTRAP_SERVERS" >"$LOCAL_ENV_FILE"

  # Checks that need nothing started yet, so a failure leaves nothing half-running.
  for svc in $services; do
    service_available "$svc" || continue
    if [[ "$svc" == detector ]] && ! service_pid detector >/dev/null; then
      check_java
    fi
    if [[ "$svc" == broker ]] && ! service_pid broker >/dev/null &&
      port_open "$BROKER_HOST" "$BROKER_PORT"; then
      die "$BROKER_HOST:$BROKER_PORT is already in use by another program; stop it or choose \
another port: BROKER_PORT=19092 ./setup.sh --local"
    fi
    if [[ "$svc" == dashboard ]] && ! service_pid dashboard >/dev/null &&
      port_open 127.0.0.1 "$STREAMLIT_SERVER_PORT"; then
      die "port $STREAMLIT_SERVER_PORT (dashboard) is already in use; choose another one: \
STREAMLIT_SERVER_PORT=8502 ./setup.sh --local"
    fi
  done
  if [[ " $services " == *" broker "* ]] && ! service_pid broker >/dev/null &&
    [[ -d "$CHECKPOINT_DIR" ]] && [[ -n "$(ls -A "$CHECKPOINT_DIR" 2>/dev/null)" ]]; then
    warn "the embedded broker keeps topics in memory only, so the detector checkpoint in \
$CHECKPOINT_DIR refers to offsets of a broker that is gone; run ./reset.sh for a clean start"
  fi

  for svc in $services; do
    if ! service_available "$svc"; then
      warn "$svc: $(service_module "$svc")/__main__.py does not exist yet; not started"
      continue
    fi
    if pid="$(service_pid "$svc")"; then
      info "$svc is already running (pid $pid)"
      continue
    fi
    rm -f "$(pid_file "$svc")"
    launch "$svc"
    started="$started $svc"
    if [[ "$svc" == broker ]]; then
      wait_for_local_broker "$(read_pid broker)"
    fi
  done

  # A service that dies at once (bad setting, missing dependency) is reported here, not later.
  if [[ -n "$started" ]]; then
    local deadline=$((SECONDS + 3)) crashed=""
    while ((SECONDS < deadline)); do
      sleep 0.5
      for svc in $started; do
        if ! service_pid "$svc" >/dev/null && [[ " $crashed " != *" $svc "* ]]; then
          crashed="$crashed $svc"
        fi
      done
    done
    if [[ -n "$crashed" ]]; then
      for svc in $crashed; do
        printf 'setup.sh: %s exited right after starting; last lines of %s:\n' "$svc" \
          "$(log_file "$svc")" >&2
        show_log_tail "$svc" >&2
      done
      die "not every service started (./setup.sh status shows the state; ./setup.sh stop cleans up)"
    fi
  fi
  if [[ " $started " == *" dashboard "* ]]; then
    wait_for_dashboard
  fi
  print_local_summary
}

describe_service() {
  case "$1" in
    broker) echo "$BROKER_HOST:$BROKER_PORT (embedded Tansu broker, topics in memory only)" ;;
    producer) echo "synthetic transactions -> Kafka topic 'transactions'" ;;
    detector) echo "Spark rules -> topic 'fraud-alerts' and ${PARQUET_DIR:-parquet_data}/alerts/" ;;
    dashboard) echo "http://${STREAMLIT_SERVER_ADDRESS:-127.0.0.1}:${STREAMLIT_SERVER_PORT:-8501}" ;;
  esac
}

print_local_summary() {
  local svc pid state py_shown
  printf '\nfraudstream, local mode (logs: %s/<service>.log, PID files: %s/):\n' "$LOG_DIR" "$PID_DIR"
  for svc in $ALL_SERVICES; do
    if pid="$(service_pid "$svc")"; then
      state="running (pid $pid)"
    elif ! service_available "$svc"; then
      state="not installed yet"
    else
      state="not started"
    fi
    printf '  %-10s %-20s %s\n' "$svc" "$state" "$(describe_service "$svc")"
  done
  py_shown="$PY"
  [[ "$py_shown" == "$ROOT/"* ]] && py_shown="${py_shown#"$ROOT/"}"
  cat <<EOF
Watch alerts:   KAFKA_BOOTSTRAP_SERVERS=$KAFKA_BOOTSTRAP_SERVERS $py_shown -m consumer
Status:         ./setup.sh status      Logs: ./setup.sh logs [service]
Stop:           ./setup.sh stop        Reset (stop + delete run/ and parquet_data/*): ./reset.sh
EOF
}

status_local() {
  local svc pid state
  load_local_env
  printf 'fraudstream local services (%s/):\n' "$RUN_DIR"
  for svc in $ALL_SERVICES; do
    if pid="$(service_pid "$svc")"; then
      printf '  %-10s running (pid %s, up %s)\n' "$svc" "$pid" "$(uptime_of "$pid")"
    elif [[ -f "$(pid_file "$svc")" ]]; then
      printf '  %-10s crashed (pid %s is gone); last lines of %s:\n' "$svc" \
        "$(read_pid "$svc" || echo '?')" "$(log_file "$svc")"
      show_log_tail "$svc" 5
    else
      state="stopped"
      service_available "$svc" || state="stopped (not installed yet)"
      printf '  %-10s %s\n' "$svc" "$state"
    fi
  done
  if port_open "$BROKER_HOST" "$BROKER_PORT"; then
    printf 'Broker %s:%s is reachable\n' "$BROKER_HOST" "$BROKER_PORT"
  else
    printf 'Broker %s:%s is not reachable\n' "$BROKER_HOST" "$BROKER_PORT"
  fi
}

stop_service() {
  local svc=$1 pid file kids kid deadline
  file="$(pid_file "$svc")"
  [[ -f "$file" ]] || return 0
  if ! pid="$(service_pid "$svc")"; then
    info "$svc was not running (stale PID file removed)"
    rm -f "$file"
    return 0
  fi
  kids="$(descendants_of "$pid")"
  info "stopping $svc (pid $pid)"
  # SIGTERM to the service itself first: it shuts its children down in order (the detector
  # stops its query before Spark's JVM; a JVM signalled at the same time dies mid-commit).
  kill -TERM "$pid" 2>/dev/null || true
  deadline=$((SECONDS + STOP_TIMEOUT))
  while ((SECONDS < deadline)) && pid_alive "$pid"; do
    sleep 0.2
  done
  # Then whatever is left of its process group and descendants: SIGTERM, a short grace, SIGKILL.
  # shellcheck disable=SC2086 # $kids is a list of pids
  if ! pid_alive "$pid" && { group_alive "$pid" || any_alive $kids; }; then
    kill -TERM -- "-$pid" 2>/dev/null || true
    for kid in $kids; do
      kill -TERM "$kid" 2>/dev/null || true
    done
    deadline=$((SECONDS + 5))
    while ((SECONDS < deadline)) && { group_alive "$pid" || any_alive $kids; }; do
      sleep 0.2
    done
  fi
  # shellcheck disable=SC2086
  if pid_alive "$pid" || group_alive "$pid" || any_alive $kids; then
    warn "$svc did not stop within ${STOP_TIMEOUT}s; sending SIGKILL to its process group"
    kill -KILL -- "-$pid" 2>/dev/null || true
    for kid in $kids; do
      kill -KILL "$kid" 2>/dev/null || true
    done
  fi
  rm -f "$file"
}

stop_local() {
  local svc reversed=""
  [[ -d "$PID_DIR" ]] || return 0
  for svc in $ALL_SERVICES; do
    reversed="$svc $reversed"
  done
  for svc in $reversed; do
    stop_service "$svc"
  done
}

logs_local() {
  local files=() svc
  if [[ -n "$LOG_SERVICE" ]]; then
    svc="$(normalize_service "$LOG_SERVICE")" ||
      usage_error "unknown service '$LOG_SERVICE' (known: $ALL_SERVICES)"
    [[ -f "$(log_file "$svc")" ]] || die "no log for $svc yet ($(log_file "$svc"))"
    files=("$(log_file "$svc")")
  else
    for svc in $ALL_SERVICES; do
      [[ -f "$(log_file "$svc")" ]] && files+=("$(log_file "$svc")")
    done
    ((${#files[@]})) || die "no logs yet in $LOG_DIR/"
  fi
  if ((FOLLOW)); then
    exec tail -n 50 -F "${files[@]}"
  fi
  tail -n 50 "${files[@]}"
}

# --- main ----------------------------------------------------------------------------------------------

while (($#)); do
  case "$1" in
    --docker) MODE=docker ;;
    --local) MODE=local ;;
    --cluster) CLUSTER=1 ;;
    --no-follow) FOLLOW=0 ;;
    -h | --help | help) usage; exit 0 ;;
    start | stop | status | logs) ACTION="$1" ;;
    -*) usage_error "unknown option '$1'" ;;
    *)
      if [[ "$ACTION" == logs && -z "$LOG_SERVICE" ]]; then
        LOG_SERVICE="$1"
      else
        usage_error "unknown command '$1'"
      fi
      ;;
  esac
  shift
done

if ((CLUSTER)) && [[ "$MODE" == local ]]; then
  usage_error "--cluster needs Docker mode"
fi

# Which mode to act on: the flag; else (for status/stop/logs) the mode of the last start; else
# Docker when an engine answers and compose exists; else local.
resolve_mode() {
  if [[ -n "$MODE" ]]; then
    echo "$MODE"
  elif [[ "$ACTION" != start && -f "$MODE_FILE" ]]; then
    cat "$MODE_FILE"
  elif docker_engine_up && find_compose; then
    echo docker
  else
    echo local
  fi
}

RESOLVED_MODE="$(resolve_mode)"
if [[ "$MODE" == docker && "$ACTION" != stop ]]; then
  docker_engine_up || die "the Docker engine does not answer ('docker info' failed); start \
it, or use ./setup.sh --local"
fi

case "$ACTION:$RESOLVED_MODE" in
  start:docker) start_docker ;;
  start:local)
    if [[ -z "$MODE" ]]; then
      if ! have docker; then
        info "no docker client installed: using local mode"
      elif ! docker_engine_up; then
        info "no Docker engine answers ('docker info' failed): using local mode"
      else
        info "a Docker engine answers but no compose is installed: using local mode"
      fi
    fi
    start_local
    ;;
  stop:*)
    load_local_env
    stop_local
    if [[ "$RESOLVED_MODE" == docker ]]; then
      stop_docker
    fi
    rm -f "$MODE_FILE"
    info "stopped"
    ;;
  status:docker) status_docker ;;
  status:local) status_local ;;
  logs:docker) logs_docker ;;
  logs:local) logs_local ;;
  *) die "unknown mode '$RESOLVED_MODE' (from $MODE_FILE?)" ;;
esac
