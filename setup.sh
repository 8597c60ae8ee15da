#!/usr/bin/env bash
# fraudstream: start, inspect and stop the whole pipeline.
#
# Docker mode (when `docker info` answers and docker compose v2 or docker-compose v1 exists):
# builds and starts docker-compose.yml as project "fraudstream". Local mode (otherwise, or with
# --local): a virtualenv in .venv, the embedded Kafka-protocol broker and the services as
# background processes, each in its own process group with a small supervisor that restarts it
# when it fails (like compose's `restart: unless-stopped`), with logs and PID files under run/.
# Both modes also run the model trainer (python -m spark_job.train, every TRAIN_EVERY_HOURS) unless
# SETUP_TRAINER=0; `./setup.sh train` trains once now, in the foreground.
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
# Start order; stop runs it backwards. The trainer comes last: it needs no broker, and its first
# round should not compete with the detector's start-up. The Spark standalone cluster (--cluster)
# starts before the detector that joins it.
readonly ALL_SERVICES="broker spark-master spark-worker-1 spark-worker-2 producer detector dashboard trainer"
readonly CLUSTER_SERVICES="spark-master spark-worker-1 spark-worker-2"
# Every compose profile, for the commands that must see all of the project's containers.
readonly ALL_PROFILES=(--profile cluster --profile trainer)
readonly BROKER_HOST=127.0.0.1
readonly STOP_TIMEOUT="${FRAUDSTREAM_STOP_TIMEOUT:-20}"
readonly BROKER_TIMEOUT="${FRAUDSTREAM_BROKER_TIMEOUT:-60}"
readonly HEALTH_TIMEOUT="${FRAUDSTREAM_HEALTH_TIMEOUT:-240}"
# Supervision in local mode: restarts in a row before giving up (SETUP_RESTART_LIMIT), the
# longest pause between two restarts, and how long a service must stay up to reset the count.
readonly RESTART_BACKOFF_MAX=30
readonly RESTART_RESET_SECONDS=60

MODE=""        # docker | local | "" (auto)
ACTION="start"
CLUSTER=0
FOLLOW=1
LOG_SERVICE=""
TRAIN_ARGS=()
PY=""
COMPOSE=()

usage() {
  cat <<'EOF'
Usage: ./setup.sh [--docker | --local] [--cluster] [COMMAND]

Commands:
  start (default)   build/install and start the pipeline, wait until it answers, print URLs
  status            show each service: running (pid, uptime) / restarting / crashed (last
                    log lines) / stopped, whether the broker answers, and (local mode) the
                    detector's epoch and how far behind the transactions topic it is
  stop              stop the local services (SIGTERM, then SIGKILL after ~20 s); in Docker
                    mode also `docker compose down` (volumes are kept; ./reset.sh removes them)
  logs [SERVICE]    follow the logs (local: run/logs/SERVICE.log; Docker: compose logs -f);
                    add --no-follow to print the last lines and exit
  train [ARGS...]   train a model once, now, in the foreground, from the Parquet history of
                    the running pipeline (python -m spark_job.train with TRAIN_EVERY_HOURS=0;
                    ARGS go to it, e.g. --algorithm gbt); prints its progress, saves
                    MODELS_DIR/<version>/ and exits with its code (2: refused, e.g. not
                    enough labelled history yet). Docker: compose run --rm trainer

Mode (default: Docker when `docker info` succeeds and compose is installed, else local):
  --docker          Docker Compose: Kafka (KRaft), producer, Spark detector, consumer,
                    Streamlit dashboard on http://localhost:8501, Kafdrop on http://localhost:9000
  --local           plain processes: embedded broker, producer, detector, dashboard, trainer
  --cluster         also start a Spark standalone master and two workers (1 core, 1g each)
                    and run the detector on them. Docker: profile `cluster`; local: from the
                    installed pyspark (python -m spark_job.standalone), supervised like the
                    other services, master on 127.0.0.1:$SPARK_MASTER_PORT (7077), its UI on
                    :$SPARK_MASTER_WEBUI_PORT (8080). The trainer stays on local[2]

Both modes:
  SETUP_TRAINER=1              1: also run the trainer service (local: a supervised
                               `python -m spark_job.train`; Docker: profile `trainer`);
                               0: leave it out (train on demand with ./setup.sh train)
  TRAIN_EVERY_HOURS=6          the trainer's schedule: train at start, then every N hours
                               (a round with too little labelled history is skipped)

Local mode environment:
  BROKER_PORT=9092             port of the embedded broker on 127.0.0.1
  FRAUDSTREAM_SERVICES="broker producer detector dashboard trainer"
                               the subset to start (in that order)
  MODELS_DIR=models            model versions: written by the trainer, read by the
                               detector (the newest, between batches) and the dashboard
  SETUP_TRAINER_NICE=10        CPU priority of the trainer (nice 0-19): on 2 cores the
                               detector keeps the CPU while a training round runs
  FRAUDSTREAM_PYTHON=/path     use this interpreter as is: no .venv, no `pip install`
  SETUP_RESTART_LIMIT=5        a service that exits non-zero (or is killed) is restarted after
                               1 s, 2 s, 4 s ... (at most 30 s); after this many restarts in a
                               row it is left `crashed` (the count resets after 60 s up; for
                               the trainer after one TRAIN_EVERY_HOURS period up). The trainer's
                               exit code 2 (refused: too little history, invalid setting) is
                               final, not restarted: a retry would give the same answer
  ON_BROKER_RESET=new-epoch    the detector's answer to the memory-only broker losing its
                               topics (local mode default; the detector's own default: fail)
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
  cid="$("${COMPOSE[@]}" "${ALL_PROFILES[@]}" ps -a -q "$1" 2>/dev/null | head -n 1)"
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
        "${COMPOSE[@]}" "${ALL_PROFILES[@]}" logs --tail=30 "$svc" >&2 || true
        die "$svc is $state (its last log lines are above)"
        ;;
    esac
    sleep 2
  done
  "${COMPOSE[@]}" "${ALL_PROFILES[@]}" logs --tail=30 "$svc" >&2 || true
  die "$svc is still '$state' after ${HEALTH_TIMEOUT}s"
}

# Build the images with the caller's uid/gid so files in the bind-mounted parquet_data/ belong
# to them (root keeps the image's default unprivileged user).
export_build_ids() {
  if [[ "$(id -u)" != 0 ]]; then
    FRAUDSTREAM_UID="$(id -u)"
    FRAUDSTREAM_GID="$(id -g)"
    export FRAUDSTREAM_UID FRAUDSTREAM_GID
  fi
}

start_docker() {
  find_compose || die "a Docker engine answers but neither 'docker compose' (v2) nor \
'docker-compose' (v1) is installed; install one (Debian/Ubuntu: sudo apt-get install \
docker-compose) or run ./setup.sh --local"
  local up=(up -d --build) profile=()
  if trainer_enabled; then
    # The trainer container restarts `unless-stopped`, i.e. after every exit: with
    # TRAIN_EVERY_HOURS=0 (train once and exit) Docker would train again and again.
    train_period_seconds >/dev/null ||
      usage_error "TRAIN_EVERY_HOURS must be a number of hours > 0 for the Docker trainer \
service, got '${TRAIN_EVERY_HOURS:-}' (one training now: ./setup.sh train)"
    profile+=(--profile trainer)
  fi
  if ((CLUSTER)); then
    profile=(--profile cluster ${profile[@]+"${profile[@]}"})
    up+=(--scale spark_job=0)
  fi
  mkdir -p "$RUN_DIR" parquet_data
  echo docker >"$MODE_FILE"
  export_build_ids
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
EOF
  if trainer_enabled; then
    echo "  Trainer                 every ${TRAIN_EVERY_HOURS:-6} h into the volume 'models' (SETUP_TRAINER=0: off)"
  else
    echo "  Trainer                 off (SETUP_TRAINER=0)"
  fi
  cat <<EOF
Watch alerts:   $(compose_display) logs -f consumer     (or ./setup.sh logs consumer)
Train now:      ./setup.sh train
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
  "${COMPOSE[@]}" "${ALL_PROFILES[@]}" down
}

status_docker() {
  find_compose || die "no docker compose / docker-compose found"
  "${COMPOSE[@]}" "${ALL_PROFILES[@]}" ps
}

# One training now in a one-off container of the trainer service (same image, volumes and
# settings); --rm drops the service's restart policy, and TRAIN_EVERY_HOURS=0 trains once.
train_docker() {
  find_compose || die "no docker compose / docker-compose found"
  docker_engine_up || die "the Docker engine does not answer ('docker info' failed)"
  export_build_ids
  local run=(run --rm -e TRAIN_EVERY_HOURS=0) rc=0
  [[ -t 0 ]] || run+=(-T)
  info "training once now: $(compose_display) --profile trainer ${run[*]} trainer python -m \
spark_job.train$(train_args_shown)"
  "${COMPOSE[@]}" --profile trainer "${run[@]}" trainer python -m spark_job.train \
    ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"} || rc=$?
  report_training "$rc" "the volume 'models'"
  exit "$rc"
}

logs_docker() {
  find_compose || die "no docker compose / docker-compose found"
  local args=(logs --tail=100)
  ((FOLLOW)) && args+=(-f)
  if [[ -n "$LOG_SERVICE" ]]; then
    args+=("$(compose_service_name "$LOG_SERVICE")")
  fi
  exec "${COMPOSE[@]}" "${ALL_PROFILES[@]}" "${args[@]}"
}

# --- local mode: services ---------------------------------------------------------------------------

service_module() {
  case "$1" in
    broker) echo fraudstream.broker ;;
    producer) echo producer ;;
    detector) echo spark_job ;;
    dashboard) echo dashboard ;;
    trainer) echo spark_job.train ;;
    spark-master | spark-worker-*) echo spark_job.standalone ;;
    *) return 1 ;;
  esac
}

# The file `python -m MODULE` runs for a service.
service_source() {
  case "$1" in
    broker) echo fraudstream/broker.py ;;
    trainer) echo spark_job/train.py ;;
    spark-master | spark-worker-*) echo spark_job/standalone.py ;;
    *) echo "$(service_module "$1")/__main__.py" ;;
  esac
}

# A service can run once its entry point exists (they are written independently).
service_available() { [[ -f "$(service_source "$1")" ]]; }

normalize_service() {
  case "$1" in
    spark_job | spark-job) echo detector ;;
    train) echo trainer ;;
    broker | producer | detector | dashboard | trainer) echo "$1" ;;
    spark-master | spark-worker-1 | spark-worker-2) echo "$1" ;;
    *) return 1 ;;
  esac
}

# --- the trainer ----------------------------------------------------------------------------------

# SETUP_TRAINER: 1 (default) runs the trainer service, 0 leaves it out.
trainer_enabled() {
  case "${SETUP_TRAINER:-1}" in
    1) return 0 ;;
    0) return 1 ;;
    *) usage_error "SETUP_TRAINER must be 0 or 1, got '$SETUP_TRAINER'" ;;
  esac
}

# The niceness the trainer runs at (SETUP_TRAINER_NICE, default 10; 0 = normal priority).
trainer_nice() {
  local nice="${SETUP_TRAINER_NICE:-10}"
  if ! [[ "$nice" =~ ^[0-9]{1,2}$ ]] || ((10#$nice > 19)); then
    usage_error "SETUP_TRAINER_NICE must be a whole number from 0 to 19, got '$nice'"
  fi
  echo "$((10#$nice))"
}

# The arguments given after `train`, for messages (empty, or a space and the arguments).
train_args_shown() {
  ((${#TRAIN_ARGS[@]})) && printf ' %s' "${TRAIN_ARGS[*]}"
  return 0
}

# TRAIN_EVERY_HOURS (default 6) in whole seconds; fails when it is not a number > 0 (0 means
# "train once", anything else is refused by the trainer's own settings).
train_period_seconds() {
  awk -v h="${TRAIN_EVERY_HOURS:-6}" 'BEGIN {
      if (h !~ /^[0-9]*\.?[0-9]+$/ || h + 0 <= 0) exit 1
      printf "%d\n", h * 3600 + 0.5
    }'
}

# Model version folders under $1, oldest first: as model_versions() in fraudstream/model.py,
# every folder whose name does not start with "." (names sort by training time).
model_versions() {
  local entry
  [[ -d "$1" ]] || return 0
  for entry in "$1"/*/; do
    [[ -d "$entry" ]] || continue
    entry="${entry%/}"
    printf '%s\n' "${entry##*/}"
  done | LC_ALL=C sort
}

# One line on the models under $1: the newest version with a model.json (the detector skips a
# folder without one: still being written, or abandoned), or "none".
model_line() {
  local dir="${1%/}" name newest="" pending="" count=0
  while IFS= read -r name; do
    [[ -n "$name" ]] || continue
    count=$((count + 1))
    [[ -z "$newest" ]] || continue
    if [[ -f "$dir/$name/model.json" ]]; then
      newest="$name"
    else
      pending="${pending:+$pending, }$name"
    fi
  done < <(model_versions "$dir" | LC_ALL=C sort -r)
  if [[ -n "$newest" ]]; then
    printf 'Model: %s, the newest of %s version folder(s) in %s/' "$newest" "$count" "$dir"
  else
    printf 'Model: none in %s/ (the detector runs on rules alone; ./setup.sh train trains one now)' \
      "$dir"
  fi
  if [[ -n "$pending" ]]; then
    printf '; without model.json (being written, or abandoned): %s' "$pending"
  fi
  printf '\n'
}

# What a training run's exit code means, after its own output.
report_training() {
  local rc=$1 where=$2
  case "$rc" in
    0) info "training finished (exit code 0): a new model version in $where; the detector \
takes it between batches" ;;
    2) info "training refused (exit code 2): nothing was saved; the reason is above (e.g. not \
enough labelled history yet: let the pipeline run longer)" ;;
    *) info "training failed (exit code $rc): nothing was saved; see the output above" ;;
  esac
}

pid_file() { echo "$PID_DIR/$1.pid"; }
supervisor_file() { echo "$PID_DIR/$1.supervisor.pid"; }
# Written by the supervisor: "restarting RC N LIMIT DELAY", "running RESTARTS", "crashed RC
# LIMIT" (it gave up) or "exited 0" (a clean exit is not restarted; nor is the trainer's
# refusal, "exited 2").
state_file() { echo "$PID_DIR/$1.state"; }
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

# Prints the pid of the service's supervisor if it is alive and supervises that service of this
# checkout.
supervisor_pid() {
  local file pid cmd
  file="$(supervisor_file "$1")"
  [[ -f "$file" ]] || return 1
  pid="$(head -n 1 "$file" 2>/dev/null || true)"
  [[ "$pid" =~ ^[0-9]+$ ]] && pid_alive "$pid" || return 1
  cmd="$(ps -ww -o args= -p "$pid" 2>/dev/null || true)"
  [[ "$cmd" == *" $ROOT/setup.sh __supervise $1 "* ]] || return 1
  echo "$pid"
}

# Running, or between two runs with its supervisor about to restart it.
service_up() { service_pid "$1" >/dev/null || supervisor_pid "$1" >/dev/null; }

read_state() {
  local file
  file="$(state_file "$1")"
  [[ -f "$file" ]] || return 1
  head -n 1 "$file" 2>/dev/null
}

# The supervisor (`setup.sh __supervise SERVICE PYTHON`): a session and process-group leader
# (setsid) running the service as its child in the same group, so stop signals them together.
launch() {
  local svc=$1 log pid deadline
  log="$(log_file "$svc")"
  rm -f "$(pid_file "$svc")" "$(supervisor_file "$svc")" "$(state_file "$svc")"
  # Without util-linux's setsid (macOS), Python does the same.
  if have setsid; then
    setsid "$BASH" "$ROOT/setup.sh" __supervise "$svc" "$PY" >>"$log" 2>&1 </dev/null &
  else
    "$PY" -c 'import os, sys; os.setsid(); os.execvp(sys.argv[1], sys.argv[1:])' \
      "$BASH" "$ROOT/setup.sh" __supervise "$svc" "$PY" >>"$log" 2>&1 </dev/null &
  fi
  deadline=$((SECONDS + 10))
  until pid="$(read_pid "$svc")"; do
    ((SECONDS < deadline)) || die "the supervisor of $svc did not start it (log: $log)"
    sleep 0.05
  done
  info "started $svc (pid $pid, supervised, log $log)"
}

# --- local mode: the supervisor --------------------------------------------------------------------

SUP_STOPPING=0
SUP_CHILD=""
SUP_SLEEPER=""
SUP_ESCAPED=""

# SIGTERM/SIGINT/SIGHUP (from stop): pass SIGTERM to the service, restart nothing, and exit once
# the service is gone.
supervisor_on_signal() {
  SUP_STOPPING=1
  if [[ -n "$SUP_CHILD" ]]; then
    kill -TERM "$SUP_CHILD" 2>/dev/null || true
  fi
  if [[ -n "$SUP_SLEEPER" ]]; then
    kill -TERM "$SUP_SLEEPER" 2>/dev/null || true
  fi
}

# Sleeps in the background so that a signal ends the pause at once.
supervisor_sleep() {
  sleep "$1" &
  SUP_SLEEPER=$!
  wait "$SUP_SLEEPER" 2>/dev/null || true
  SUP_SLEEPER=""
}

# Remembers "pid args" of the service's descendants outside this process group (the broker runs
# tansu in its own session), so that they can be ended if the service dies without ending them.
supervisor_snapshot() {
  local table="$PID_DIR/.$1.ps" pid args
  ps -A -o pid=,ppid=,pgid= >"$table" 2>/dev/null || return 0
  SUP_ESCAPED=""
  while read -r pid; do
    args="$(ps -ww -o args= -p "$pid" 2>/dev/null || true)"
    [[ -n "$args" ]] && SUP_ESCAPED+="$pid $args"$'\n'
  done < <(awk -v root="$SUP_CHILD" -v group="$$" '
      { parent[$1] = $2; grp[$1] = $3 }
      END {
        for (p in parent) {
          q = parent[p]
          while (q != root && (q in parent) && q > 1) q = parent[q]
          if (q == root && grp[p] != group) print p
        }
      }' "$table")
  rm -f "$table"
}

# After the service exited: ends what it left behind (children orphaned in this process group,
# remembered descendants outside it), so the next start finds its port and files free.
supervisor_cleanup() {
  local svc=$1 table="$PID_DIR/.$1.ps" leftovers="" line pid args deadline
  # ps runs as a direct child (no command substitution), so only processes whose parent is not
  # in this group are orphans: the service's children, not the supervisor's helpers.
  ps -A -o pid=,ppid=,pgid=,stat= >"$table" 2>/dev/null || true
  leftovers="$(awk -v group="$$" '
      { grp[$1] = $3; ppid[$1] = $2; st[$1] = $4 }
      END {
        for (p in grp) if (grp[p] == group && p != group && !(grp[ppid[p]] == group) && st[p] !~ /^Z/) {
          roots[p] = 1
        }
        do {
          more = 0
          for (p in grp) if (!(p in roots) && (ppid[p] in roots) && st[p] !~ /^Z/) { roots[p] = 1; more = 1 }
        } while (more)
        for (p in roots) print p
      }' "$table" | xargs)"
  rm -f "$table"
  while IFS= read -r line; do
    [[ -n "$line" ]] || continue
    pid="${line%% *}"
    args="${line#* }"
    if [[ "$(ps -ww -o args= -p "$pid" 2>/dev/null || true)" == "$args" ]] && pid_alive "$pid"; then
      leftovers="$leftovers $pid"
    fi
  done <<<"$SUP_ESCAPED"
  SUP_ESCAPED=""
  # shellcheck disable=SC2086 # a list of pids
  set -- $leftovers
  (($#)) || return 0
  printf 'setup.sh: ending what %s left running (pids %s)\n' "$svc" "$*"
  kill -TERM "$@" 2>/dev/null || true
  deadline=$((SECONDS + 5))
  while ((SECONDS < deadline)) && ((!SUP_STOPPING)) && any_alive "$@"; do
    sleep 0.2
  done
  kill -KILL "$@" 2>/dev/null || true
}

supervise() {
  local svc=$1 module pidfile statefile limit rc restarts=0 total=0 delay started snapshot_at
  local reset_after=$RESTART_RESET_SECONDS period nice cmd=()
  PY=$2
  module="$(service_module "$svc")" || die "unknown service '$svc'"
  pidfile="$(pid_file "$svc")"
  statefile="$(state_file "$svc")"
  limit="${SETUP_RESTART_LIMIT:-5}"
  [[ "$limit" =~ ^[0-9]+$ ]] || limit=5
  cmd=("$PY" -m "$module")
  case "$svc" in
    spark-master) cmd+=(master) ;;
    spark-worker-*) cmd+=(worker) ;;
    trainer)
      # The cluster's cores belong to the detector, which holds them for good: a trainer
      # joining it would wait for executors forever. It trains on local[2] beside it.
      if [[ -n "${SPARK_CLUSTER_HOST:-}" && "${SPARK_MASTER:-}" == "spark://$SPARK_CLUSTER_HOST:"* ]]; then
        export SPARK_MASTER="local[2]"
      fi
      ;;
  esac
  if [[ "$svc" == trainer ]]; then
    # At a lower CPU priority: on 2 cores the detector keeps up while a round runs.
    nice="$(trainer_nice 2>/dev/null || echo 10)"
    if ((nice > 0)) && have nice; then
      cmd=(nice -n "$nice" "${cmd[@]}")
    fi
    # A training round takes minutes: a trainer that crashes mid-round every time would outlive
    # the 60 s reset and train again and again. Its count resets after one full period up.
    if period="$(train_period_seconds)" && ((period > reset_after)); then
      reset_after=$period
    fi
  fi
  trap supervisor_on_signal TERM INT HUP
  echo "$$" >"$(supervisor_file "$svc")"
  while :; do
    printf '\n===== %s: starting %s (%s) =====\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
      "$svc" "${cmd[*]}"
    "${cmd[@]}" </dev/null &
    SUP_CHILD=$!
    echo "$SUP_CHILD" >"$pidfile.tmp"
    mv -f "$pidfile.tmp" "$pidfile"
    if ((total)); then
      echo "running $total" >"$statefile"
    fi
    started=$SECONDS
    snapshot_at=$((SECONDS + 1))
    ((SUP_STOPPING)) && kill -TERM "$SUP_CHILD" 2>/dev/null
    while ((!SUP_STOPPING)) && kill -0 "$SUP_CHILD" 2>/dev/null; do
      supervisor_sleep 1
      if ((!SUP_STOPPING && SECONDS >= snapshot_at)); then
        supervisor_snapshot "$svc"
        snapshot_at=$((SECONDS + (SECONDS - started < 5 ? 2 : 10)))
      fi
    done
    # A signal interrupts `wait`: wait again until the service is really gone.
    rc=0
    wait "$SUP_CHILD" 2>/dev/null || rc=$?
    while kill -0 "$SUP_CHILD" 2>/dev/null; do
      rc=0
      wait "$SUP_CHILD" 2>/dev/null || rc=$?
    done
    SUP_CHILD=""
    ((SUP_STOPPING)) && exit 0
    supervisor_cleanup "$svc"
    ((SUP_STOPPING)) && exit 0
    if ((rc == 0)); then
      printf 'setup.sh: %s exited with code 0; not restarted\n' "$svc"
      echo "exited 0" >"$statefile"
      exit 0
    fi
    # The trainer's 2 is a refusal (too little labelled history for TRAIN_EVERY_HOURS=0's one
    # training, or an invalid setting): restarting it would only repeat the answer and its JVM.
    if [[ "$svc" == trainer ]] && ((rc == 2)); then
      printf 'setup.sh: %s exited with code 2 (refused, see above); not restarted\n' "$svc"
      echo "exited 2" >"$statefile"
      exit 0
    fi
    if ((SECONDS - started >= reset_after)); then
      restarts=0
    fi
    if ((restarts >= limit)); then
      printf 'setup.sh: %s exited with code %s; gave up after %s restarts in a row%s\n' \
        "$svc" "$rc" "$restarts" " (SETUP_RESTART_LIMIT=$limit): crashed"
      echo "crashed $rc $limit" >"$statefile"
      exit 0
    fi
    restarts=$((restarts + 1))
    total=$((total + 1))
    delay=$((1 << (restarts - 1 < 5 ? restarts - 1 : 5)))
    ((delay > RESTART_BACKOFF_MAX)) && delay=$RESTART_BACKOFF_MAX
    printf 'setup.sh: %s exited with code %s; restart %s of %s in %s s\n' "$svc" "$rc" \
      "$restarts" "$limit" "$delay"
    echo "restarting $rc $restarts $limit $delay" >"$statefile"
    supervisor_sleep "$delay"
    ((SUP_STOPPING)) && exit 0
  done
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
  # Keep the canonical start order whatever order the user wrote; SETUP_TRAINER=0 leaves the
  # trainer out even when FRAUDSTREAM_SERVICES names it.
  local ordered=""
  for svc in $ALL_SERVICES; do
    if [[ "$svc" == trainer ]] && ! trainer_enabled; then
      continue
    fi
    if [[ " $CLUSTER_SERVICES " == *" $svc "* ]]; then
      # The cluster comes with --cluster, whole, whatever FRAUDSTREAM_SERVICES says.
      ((CLUSTER)) && ordered="$ordered $svc"
      continue
    fi
    [[ " $out " == *" $svc "* ]] && ordered="$ordered $svc"
  done
  echo "$ordered" | xargs
}

# Whether the last local start ran the Spark standalone cluster (or this one asks for it).
cluster_in_use() {
  ((CLUSTER)) || [[ "$(local_env_value SPARK_CLUSTER)" == 1 ]] ||
    [[ -f "$(pid_file spark-master)" || -f "$(supervisor_file spark-master)" ]]
}

# The services status and the summary show: the cluster's only when it is in use.
shown_services() {
  local svc out=""
  for svc in $ALL_SERVICES; do
    if [[ " $CLUSTER_SERVICES " == *" $svc "* ]] && ! cluster_in_use; then
      continue
    fi
    out="$out $svc"
  done
  echo "$out" | xargs
}

# The cluster's settings (python -m spark_job.standalone reads the same names) and the master
# URL the detector joins; recorded in run/local.env for status.
cluster_env() {
  export SPARK_CLUSTER_HOST=127.0.0.1
  export SPARK_MASTER_PORT="${SPARK_MASTER_PORT:-7077}"
  export SPARK_MASTER_WEBUI_PORT="${SPARK_MASTER_WEBUI_PORT:-8080}"
  [[ "$SPARK_MASTER_PORT" =~ ^[0-9]+$ ]] ||
    usage_error "SPARK_MASTER_PORT must be a number, got '$SPARK_MASTER_PORT'"
  [[ "$SPARK_MASTER_WEBUI_PORT" =~ ^[0-9]+$ ]] ||
    usage_error "SPARK_MASTER_WEBUI_PORT must be a number, got '$SPARK_MASTER_WEBUI_PORT'"
  export SPARK_MASTER="spark://$SPARK_CLUSTER_HOST:$SPARK_MASTER_PORT"
}

# Until the master counts both workers alive (the detector would otherwise wait for executors
# with nothing but a warning).
wait_for_cluster() {
  local deadline=$((SECONDS + HEALTH_TIMEOUT)) out="" svc
  info "waiting for the Spark master $SPARK_MASTER to count 2 alive workers ..."
  while ((SECONDS < deadline)); do
    out="$("$PY" -m spark_job.standalone status 2>&1 || true)"
    [[ "$out" == *": 2 alive worker"* ]] && return 0
    for svc in $CLUSTER_SERVICES; do
      service_up "$svc" || {
        show_log_tail "$svc" >&2
        die "$svc exited while the cluster was starting (log: $(log_file "$svc"))"
      }
    done
    sleep 1
  done
  die "the Spark cluster did not come up within ${HEALTH_TIMEOUT}s: $out"
}

# A value the last start recorded in run/local.env (empty when it recorded none).
local_env_value() {
  [[ -f "$LOCAL_ENV_FILE" ]] || return 0
  sed -n "s/^$1=//p" "$LOCAL_ENV_FILE" | head -n 1
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
  local services requested svc pid port started="" java_checked=0
  trainer_enabled || true # validates SETUP_TRAINER
  trainer_nice >/dev/null
  services="$(selected_services)"
  requested="$(SETUP_TRAINER=1 selected_services)"
  if [[ -z "$services" && "$requested" == trainer ]]; then
    usage_error "FRAUDSTREAM_SERVICES selects only the trainer, and SETUP_TRAINER=0 leaves it out"
  fi
  [[ -n "$services" ]] || usage_error "FRAUDSTREAM_SERVICES selects no service"
  BROKER_PORT="${BROKER_PORT:-9092}"
  [[ "$BROKER_PORT" =~ ^[0-9]+$ ]] || usage_error "BROKER_PORT must be a number, got '$BROKER_PORT'"
  [[ "${SETUP_RESTART_LIMIT:-5}" =~ ^[0-9]+$ ]] ||
    usage_error "SETUP_RESTART_LIMIT must be a whole number, got '$SETUP_RESTART_LIMIT'"
  info "local mode (run folder: $RUN_DIR/; services: $services)"
  if [[ " $requested " == *" trainer "* && " $services " != *" trainer "* ]]; then
    info "SETUP_TRAINER=0: the trainer is not started (./setup.sh train trains once, on demand)"
  fi

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
  # The embedded broker keeps topics in memory: when it restarts, the detector archives its
  # checkpoint and starts a new epoch instead of stopping (the detector's own default is fail).
  export ON_BROKER_RESET="${ON_BROKER_RESET:-new-epoch}"
  # Model versions: the trainer writes them, the detector and the dashboard read them.
  export MODELS_DIR="${MODELS_DIR:-models}"
  export TRAIN_EVERY_HOURS="${TRAIN_EVERY_HOURS:-6}"
  if ((CLUSTER)); then
    cluster_env
  fi
  # What status and train need to look at the same broker, interpreter and files.
  {
    printf 'BROKER_PORT=%s\nKAFKA_BOOTSTRAP_SERVERS=%s\nPYTHON=%s\n' "$BROKER_PORT" \
      "$KAFKA_BOOTSTRAP_SERVERS" "$PY"
    printf 'CHECKPOINT_DIR=%s\nPARQUET_DIR=%s\n' "$CHECKPOINT_DIR" "$PARQUET_DIR"
    printf 'MODELS_DIR=%s\nTRAIN_EVERY_HOURS=%s\nSETUP_TRAINER=%s\n' "$MODELS_DIR" \
      "$TRAIN_EVERY_HOURS" "${SETUP_TRAINER:-1}"
    [[ -z "${METRICS_FILE:-}" ]] || printf 'METRICS_FILE=%s\n' "$METRICS_FILE"
    [[ -z "${TRANSACTIONS_TOPIC:-}" ]] || printf 'TRANSACTIONS_TOPIC=%s\n' "$TRANSACTIONS_TOPIC"
    if ((CLUSTER)); then
      printf 'SPARK_CLUSTER=1\nSPARK_MASTER_PORT=%s\nSPARK_MASTER_WEBUI_PORT=%s\n' \
        "$SPARK_MASTER_PORT" "$SPARK_MASTER_WEBUI_PORT"
    fi
  } >"$LOCAL_ENV_FILE"

  # Checks that need nothing started yet, so a failure leaves nothing half-running.
  for svc in $services; do
    service_available "$svc" || continue
    if [[ "$svc" == detector || "$svc" == trainer || "$svc" == spark-* ]] &&
      ! service_up "$svc" && ((!java_checked)); then
      check_java
      java_checked=1
    fi
    if [[ "$svc" == broker ]] && ! service_up broker && port_open "$BROKER_HOST" "$BROKER_PORT"; then
      die "$BROKER_HOST:$BROKER_PORT is already in use by another program; stop it or choose \
another port: BROKER_PORT=19092 ./setup.sh --local"
    fi
    if [[ "$svc" == spark-master ]] && ! service_up spark-master; then
      for port in "$SPARK_MASTER_PORT" "$SPARK_MASTER_WEBUI_PORT"; do
        port_open 127.0.0.1 "$port" && die "port $port (Spark master) is already in use; \
choose others: SPARK_MASTER_PORT=17077 SPARK_MASTER_WEBUI_PORT=18080 ./setup.sh --local --cluster"
      done
    fi
    if [[ "$svc" == dashboard ]] && ! service_up dashboard &&
      port_open 127.0.0.1 "$STREAMLIT_SERVER_PORT"; then
      die "port $STREAMLIT_SERVER_PORT (dashboard) is already in use; choose another one: \
STREAMLIT_SERVER_PORT=8502 ./setup.sh --local"
    fi
  done
  if [[ " $services " == *" broker "* ]] && ! service_up broker &&
    [[ -d "$CHECKPOINT_DIR" ]] && [[ -n "$(ls -A "$CHECKPOINT_DIR" 2>/dev/null)" ]]; then
    if [[ "$ON_BROKER_RESET" == new-epoch ]]; then
      info "the embedded broker starts empty: the detector will archive its checkpoint in \
$CHECKPOINT_DIR and start a new epoch (ON_BROKER_RESET=new-epoch); ./reset.sh wipes everything"
    else
      warn "the embedded broker keeps topics in memory only, so the detector checkpoint in \
$CHECKPOINT_DIR refers to offsets of a broker that is gone (ON_BROKER_RESET=$ON_BROKER_RESET); \
run ./reset.sh for a clean start"
    fi
  fi

  for svc in $services; do
    if ! service_available "$svc"; then
      warn "$svc: $(service_source "$svc") does not exist yet; not started"
      continue
    fi
    if pid="$(service_pid "$svc")"; then
      info "$svc is already running (pid $pid)"
      continue
    fi
    if pid="$(supervisor_pid "$svc")"; then
      info "$svc is being restarted by its supervisor (pid $pid); see ./setup.sh status"
      continue
    fi
    launch "$svc"
    started="$started $svc:$(read_pid "$svc")"
    if [[ "$svc" == broker ]]; then
      wait_for_local_broker "$(read_pid broker)"
    fi
    if [[ "$svc" == spark-worker-2 ]]; then
      wait_for_cluster
    fi
  done

  # A service that dies at once (bad setting, missing dependency) is reported here, not later
  # (its supervisor goes on restarting it until SETUP_RESTART_LIMIT).
  if [[ -n "$started" ]]; then
    local deadline=$((SECONDS + 3)) crashed="" entry
    while ((SECONDS < deadline)); do
      sleep 0.5
      for entry in $started; do
        svc="${entry%%:*}"
        if [[ "$(service_pid "$svc" || true)" != "${entry#*:}" ]] &&
          [[ " $crashed " != *" $svc "* ]]; then
          crashed="$crashed $svc"
        fi
      done
    done
    if [[ " $crashed " == *" trainer "* ]] && trainer_finished; then
      # Not a crash: a finished one-off round (TRAIN_EVERY_HOURS=0) or a refusal (code 2),
      # which its supervisor does not restart; the rest of the pipeline is fine.
      entry="$(read_state trainer || true)"
      warn "the trainer exited with code ${entry#exited } and is not restarted; last lines of \
$(log_file trainer):"
      show_log_tail trainer 5 >&2
      entry=""
      for svc in $crashed; do
        [[ "$svc" == trainer ]] || entry="$entry $svc"
      done
      crashed="$entry"
    fi
    if [[ -n "$crashed" ]]; then
      for svc in $crashed; do
        printf 'setup.sh: %s exited right after starting; last lines of %s:\n' "$svc" \
          "$(log_file "$svc")" >&2
        show_log_tail "$svc" >&2
      done
      die "not every service started (a failing service is restarted up to \
SETUP_RESTART_LIMIT=${SETUP_RESTART_LIMIT:-5} times; ./setup.sh status shows the state; \
./setup.sh stop stops everything)"
    fi
  fi
  if [[ " $started " == *" dashboard:"* ]]; then
    wait_for_dashboard
  fi
  print_local_summary
}

# After the trainer left within the start check: waits (briefly) for its supervisor to record
# the outcome and succeeds when the trainer exited for good ("exited 0" or "exited 2").
trainer_finished() {
  local deadline=$((SECONDS + 5)) state
  while :; do
    state="$(read_state trainer || true)"
    [[ "$state" == exited\ * ]] && return 0
    [[ "$state" == restarting\ * || "$state" == crashed\ * ]] && return 1
    ((SECONDS < deadline)) || return 1
    sleep 0.2
  done
}

# The Spark master's port (or, with WEBUI_, its UI's): this start's, else the last one's.
cluster_port() {
  local name="SPARK_MASTER_${1:-}PORT" default=7077 value
  [[ -z "${1:-}" ]] || default=8080
  value="${!name:-}"
  [[ -n "$value" ]] || value="$(local_env_value "$name")"
  echo "${value:-$default}"
}

describe_service() {
  local schedule
  case "$1" in
    broker) echo "$BROKER_HOST:$BROKER_PORT (embedded Tansu broker, topics in memory only)" ;;
    producer) echo "synthetic transactions -> Kafka topic 'transactions'" ;;
    detector)
      if cluster_in_use; then
        echo "Spark rules on spark://127.0.0.1:$(cluster_port) -> topic 'fraud-alerts' and ${PARQUET_DIR:-parquet_data}/alerts/"
      else
        echo "Spark rules -> topic 'fraud-alerts' and ${PARQUET_DIR:-parquet_data}/alerts/"
      fi
      ;;
    spark-master) echo "spark://127.0.0.1:$(cluster_port), UI http://127.0.0.1:$(cluster_port WEBUI_)" ;;
    spark-worker-*) echo "${SPARK_WORKER_CORES:-1} core(s) and ${SPARK_WORKER_MEMORY:-1g} for the detector's executors" ;;
    dashboard) echo "http://${STREAMLIT_SERVER_ADDRESS:-127.0.0.1}:${STREAMLIT_SERVER_PORT:-8501}" ;;
    trainer)
      schedule="every ${TRAIN_EVERY_HOURS:-6} h"
      train_period_seconds >/dev/null || schedule="once"
      echo "${PARQUET_DIR:-parquet_data}/ -> model versions in ${MODELS_DIR:-models}/, $schedule"
      ;;
  esac
}

print_local_summary() {
  local svc pid state py_shown
  printf '\nfraudstream, local mode (logs: %s/<service>.log, PID files: %s/):\n' "$LOG_DIR" "$PID_DIR"
  for svc in $(shown_services); do
    if pid="$(service_pid "$svc")"; then
      state="running (pid $pid)"
    elif ! service_available "$svc"; then
      state="not installed yet"
    elif [[ "$svc" == trainer ]] && ! trainer_enabled; then
      state="off (SETUP_TRAINER=0)"
    elif state="$(read_state "$svc")" && [[ "$state" == exited\ * ]]; then
      state="exited (code ${state#exited })"
    else
      state="not started"
    fi
    printf '  %-14s %-21s %s\n' "$svc" "$state" "$(describe_service "$svc")"
  done
  py_shown="$PY"
  [[ "$py_shown" == "$ROOT/"* ]] && py_shown="${py_shown#"$ROOT/"}"
  cat <<EOF
Watch alerts:   KAFKA_BOOTSTRAP_SERVERS=$KAFKA_BOOTSTRAP_SERVERS $py_shown -m consumer
Train now:      ./setup.sh train       (one training in the foreground, into $MODELS_DIR/)
Status:         ./setup.sh status      Logs: ./setup.sh logs [service]
Stop:           ./setup.sh stop        Reset (stop + delete run/, models/, parquet_data/*): ./reset.sh
EOF
}

status_local() {
  local svc pid state rc restarts limit delay
  load_local_env
  printf 'fraudstream local services (%s/):\n' "$RUN_DIR"
  for svc in $(shown_services); do
    state="$(read_state "$svc" || true)"
    if pid="$(service_pid "$svc")"; then
      restarts=""
      if [[ "$state" == running\ * ]]; then
        restarts=", restarts: ${state#running }"
      fi
      printf '  %-14s running (pid %s, up %s%s)\n' "$svc" "$pid" "$(uptime_of "$pid")" "$restarts"
    elif pid="$(supervisor_pid "$svc")"; then
      if [[ "$state" == restarting\ * ]]; then
        read -r _ rc restarts limit delay <<<"$state"
        printf '  %-14s restarting (exited with code %s; restart %s of %s after %s s); last lines of %s:\n' \
          "$svc" "$rc" "$restarts" "$limit" "$delay" "$(log_file "$svc")"
      else
        printf '  %-14s restarting (supervisor pid %s); last lines of %s:\n' "$svc" "$pid" \
          "$(log_file "$svc")"
      fi
      show_log_tail "$svc" 5
    elif state="$(read_state "$svc" || true)" && [[ "$state" == crashed\ * ]]; then
      read -r _ rc limit <<<"$state"
      printf '  %-14s crashed (exited with code %s after %s restarts in a row); last lines of %s:\n' \
        "$svc" "$rc" "$limit" "$(log_file "$svc")"
      show_log_tail "$svc" 5
    elif [[ "$state" == exited\ * ]]; then
      printf '  %-14s exited (code %s, not restarted); last lines of %s:\n' "$svc" \
        "${state#exited }" "$(log_file "$svc")"
      show_log_tail "$svc" 5
    elif [[ -f "$(pid_file "$svc")" ]]; then
      printf '  %-14s crashed (pid %s is gone, and its supervisor too); last lines of %s:\n' \
        "$svc" "$(read_pid "$svc" || echo '?')" "$(log_file "$svc")"
      show_log_tail "$svc" 5
    else
      state="stopped"
      if ! service_available "$svc"; then
        state="stopped (not installed yet)"
      elif [[ "$svc" == trainer && "$(local_env_value SETUP_TRAINER)" == 0 ]]; then
        state="stopped (SETUP_TRAINER=0; ./setup.sh train trains on demand)"
      fi
      printf '  %-14s %s\n' "$svc" "$state"
    fi
  done
  if port_open "$BROKER_HOST" "$BROKER_PORT"; then
    printf 'Broker %s:%s is reachable\n' "$BROKER_HOST" "$BROKER_PORT"
  else
    printf 'Broker %s:%s is not reachable\n' "$BROKER_HOST" "$BROKER_PORT"
  fi
  if cluster_in_use && service_up spark-master; then
    cluster_status
  fi
  model_line "$(models_dir)"
  if service_up detector; then
    detector_progress
  fi
}

# What the Spark master says about its workers (python -m spark_job.standalone status).
cluster_status() {
  local py
  py="$(local_env_value PYTHON)"
  [[ -n "$py" ]] || py="${FRAUDSTREAM_PYTHON:-$ROOT/$VENV_DIR/bin/python}"
  [[ -x "$py" ]] || return 0
  SPARK_MASTER_PORT="$(cluster_port)" SPARK_MASTER_WEBUI_PORT="$(cluster_port WEBUI_)" \
    "$py" -m spark_job.standalone status 2>&1 || true
}

# MODELS_DIR: the caller's, else what the last start used, else models/.
models_dir() {
  local dir="${MODELS_DIR:-}"
  [[ -n "$dir" ]] || dir="$(local_env_value MODELS_DIR)"
  echo "${dir:-models}"
}

# The detector's epoch, last committed batch and lag (python -m spark_job.status), with the
# settings the last start gave the detector; never fails status itself.
detector_progress() {
  local py name value settings=()
  py="$(local_env_value PYTHON)"
  [[ -n "$py" ]] || py="${FRAUDSTREAM_PYTHON:-$ROOT/$VENV_DIR/bin/python}"
  if [[ ! -x "$py" ]] || [[ ! -f spark_job/status.py ]]; then
    return 0
  fi
  for name in KAFKA_BOOTSTRAP_SERVERS CHECKPOINT_DIR PARQUET_DIR METRICS_FILE TRANSACTIONS_TOPIC; do
    value="${!name:-}"
    [[ -n "$value" ]] || value="$(local_env_value "$name")"
    [[ -z "$value" ]] || settings+=("$name=$value")
  done
  if have timeout; then
    timeout 15 env ${settings[@]+"${settings[@]}"} "$py" -m spark_job.status 2>&1 |
      sed 's/^/  /' || true
  else
    env ${settings[@]+"${settings[@]}"} "$py" -m spark_job.status 2>&1 | sed 's/^/  /' || true
  fi
}

stop_service() {
  local svc=$1 pid="" sup="" leader kids kid deadline
  if [[ ! -f "$(pid_file "$svc")" && ! -f "$(supervisor_file "$svc")" ]]; then
    rm -f "$(state_file "$svc")"
    return 0
  fi
  pid="$(service_pid "$svc" || true)"
  sup="$(supervisor_pid "$svc" || true)"
  if [[ -z "$pid" && -z "$sup" ]]; then
    info "$svc was not running (stale PID file removed)"
    rm -f "$(pid_file "$svc")" "$(supervisor_file "$svc")" "$(state_file "$svc")"
    return 0
  fi
  # The supervisor leads the process group (a service started before supervision leads its own).
  leader="${sup:-$pid}"
  kids="$(descendants_of "$leader")"
  info "stopping $svc (pid ${pid:-none}${sup:+, supervisor $sup})"
  # SIGTERM to the service itself first (through its supervisor, which then restarts nothing and
  # exits once the service is gone): it shuts its children down in order (the detector stops its
  # query before Spark's JVM; a JVM signalled at the same time dies mid-commit).
  kill -TERM "$leader" 2>/dev/null || true
  deadline=$((SECONDS + STOP_TIMEOUT))
  while ((SECONDS < deadline)) && { { [[ -n "$pid" ]] && pid_alive "$pid"; } || pid_alive "$leader"; }; do
    sleep 0.2
  done
  # Then whatever is left of its process group and descendants: SIGTERM, a short grace, SIGKILL.
  # shellcheck disable=SC2086 # $kids is a list of pids
  if ! pid_alive "$leader" && { group_alive "$leader" || any_alive $kids; }; then
    kill -TERM -- "-$leader" 2>/dev/null || true
    for kid in $kids; do
      kill -TERM "$kid" 2>/dev/null || true
    done
    deadline=$((SECONDS + 5))
    while ((SECONDS < deadline)) && { group_alive "$leader" || any_alive $kids; }; do
      sleep 0.2
    done
  fi
  # shellcheck disable=SC2086
  if pid_alive "$leader" || group_alive "$leader" || any_alive $kids; then
    warn "$svc did not stop within ${STOP_TIMEOUT}s; sending SIGKILL to its process group"
    kill -KILL -- "-$leader" 2>/dev/null || true
    for kid in $kids; do
      kill -KILL "$kid" 2>/dev/null || true
    done
  fi
  rm -f "$(pid_file "$svc")" "$(supervisor_file "$svc")" "$(state_file "$svc")"
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

# One training now, in the foreground: python -m spark_job.train with TRAIN_EVERY_HOURS=0 against
# the files the last start used (PARQUET_DIR, MODELS_DIR from run/local.env unless set here), at
# the trainer's CPU priority. Its output is the progress; its exit code is ours.
train_local() {
  local py parquet models pid nice rc=0 begun cmd=()
  service_available trainer || die "$(service_source trainer) does not exist yet: nothing to \
train with"
  nice="$(trainer_nice)"
  py="${FRAUDSTREAM_PYTHON:-}"
  [[ -n "$py" ]] || py="$(local_env_value PYTHON)"
  if [[ -n "$py" && -x "$py" ]]; then
    PY="$py"
  else
    mkdir -p "$LOG_DIR"
    setup_python
  fi
  check_java
  parquet="${PARQUET_DIR:-}"
  [[ -n "$parquet" ]] || parquet="$(local_env_value PARQUET_DIR)"
  parquet="${parquet:-parquet_data}"
  models="$(models_dir)"
  if pid="$(service_pid trainer)"; then
    info "the trainer service (pid $pid) keeps its own schedule; this training is one more"
  fi
  cmd=(env "PARQUET_DIR=$parquet" "MODELS_DIR=$models" TRAIN_EVERY_HOURS=0
    "SPARK_LOCAL_IP=${SPARK_LOCAL_IP:-127.0.0.1}" "$PY" -m spark_job.train)
  if ((nice > 0)) && have nice; then
    cmd=(nice -n "$nice" "${cmd[@]}")
  fi
  info "training once now: python -m spark_job.train$(train_args_shown) \
(PARQUET_DIR=$parquet, MODELS_DIR=$models, nice $nice)"
  begun=$SECONDS
  "${cmd[@]}" ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"} || rc=$?
  info "python -m spark_job.train exited with code $rc after $((SECONDS - begun)) s"
  report_training "$rc" "$models/"
  model_line "$models"
  exit "$rc"
}

# --- main ----------------------------------------------------------------------------------------------

# Internal: launch() runs `setup.sh __supervise SERVICE PYTHON` as the service's supervisor.
if [[ "${1:-}" == __supervise ]]; then
  (($# == 3)) || die "usage: setup.sh __supervise SERVICE PYTHON"
  supervise "$2" "$3"
  exit 0
fi

while (($#)); do
  case "$1" in
    --docker) MODE=docker ;;
    --local) MODE=local ;;
    --cluster) CLUSTER=1 ;;
    --no-follow) FOLLOW=0 ;;
    -h | --help | help) usage; exit 0 ;;
    start | stop | status | logs) ACTION="$1" ;;
    train)
      # Everything after `train` is for python -m spark_job.train.
      ACTION=train
      shift
      TRAIN_ARGS=("$@")
      break
      ;;
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
  train:docker) train_docker ;;
  train:local) train_local ;;
  *) die "unknown mode '$RESOLVED_MODE' (from $MODE_FILE?)" ;;
esac
