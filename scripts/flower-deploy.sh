#!/usr/bin/env bash
# flora on a Flower 1.41 deployment on this machine (loopback): one SuperLink, one SuperNode per
# client (node config partition-id=K num-partitions=N) with its warm `flora flower-worker`,
# `flwr run flower-app`, wait for the run, then stop every process this script started, by
# process-group id. See docs/flower.md.
#
# Nodes, by default: `flora flower-supernode` (Flower's SuperNode polling every --idle-poll s
# instead of 3 s) with --isolation process, and a `flora flower-worker --supernode` as its
# executor (ClientApp tasks run in that warm process; none starts per message).
#
#   scripts/flower-deploy.sh [-c CONFIG.toml] [-s 'a.b=1;c.d=2'] [-o RUN_DIR] [-n NODES]
#                            [-t TIMEOUT_S] [-w WORKER_CMD] [--tls] [--auth [--intruder]] [--sim]
#                            [--relay | --no-workers] [--idle-poll S] [--keep]
#
#   -c  flora config (default configs/tiny.toml)     -s  overrides, ';'-separated (no quote ')
#   -o  run directory (default runs/flower-<time>)   -n  nodes (default federation.num_clients)
#   -t  give up after this many seconds (default 1800; exit code 124)
#   -w  the worker command, given --socket PATH (default 'flora flower-worker'; tests wrap it)
#   --tls   make a throwaway CA and server certificate (openssl) and use TLS everywhere
#   --auth  SuperNode authentication (implies --tls): the SuperLink admits only registered nodes;
#           one ECDSA P-384 key pair per node (ssh-keygen), each public key registered with
#           `flwr supernode register` before its SuperNode starts
#   --intruder  (with --auth) also start one SuperNode whose key is not registered, claiming
#           partition 0: the SuperLink refuses it (its log: RUN_DIR/logs/intruder.log)
#   --sim   SuperLink in simulation mode (Ray runs the ClientApps; no SuperNodes started)
#   --relay  Flower starts a ClientApp process per message, which hands it to the node's
#           flower-worker over a Unix socket (node config worker=PATH)
#   --no-workers  no flower-worker: every ClientApp process imports torch and loads the model
#   --idle-poll S  the SuperNodes' idle poll (default 0.2; 0: Flower's flower-supernode, 3 s)
#   --keep  keep the work directory (FLWR_HOME, node state, certificates)
# Logs go to RUN_DIR/logs/ (pids: the process groups started). Exit code 0: finished:completed.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
APP="$ROOT/flower-app"
WORKER_CMD=(flora flower-worker)
CONFIG="$ROOT/configs/tiny.toml" SET="" RUN_DIR="" NODES="" TIMEOUT=1800 TLS=0 SIM=0 KEEP=0
AUTH=0 INTRUDER=0 MODE=executor IDLE_POLL=0.2
while [[ $# -gt 0 ]]; do
  case "$1" in
    -c) CONFIG="$2"; shift 2 ;;
    -s) SET="$2"; shift 2 ;;
    -o) RUN_DIR="$2"; shift 2 ;;
    -n) NODES="$2"; shift 2 ;;
    -t) TIMEOUT="$2"; shift 2 ;;
    -w) read -ra WORKER_CMD <<< "$2"; shift 2 ;;
    --tls) TLS=1; shift ;;
    --auth) AUTH=1; TLS=1; shift ;;
    --intruder) INTRUDER=1; shift ;;
    --sim) SIM=1; shift ;;
    --keep) KEEP=1; shift ;;
    --no-workers) MODE=plain; shift ;;
    --relay) MODE=relay; shift ;;
    --idle-poll) IDLE_POLL="$2"; shift 2 ;;
    -h|--help) sed -n '2,33p' "$0"; exit 0 ;;
    *) echo "flower-deploy: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ $INTRUDER == 1 && $AUTH == 0 ]] && { echo "flower-deploy: --intruder needs --auth" >&2; exit 2; }
[[ $AUTH == 1 && $SIM == 1 ]] \
  && { echo "flower-deploy: --auth authenticates SuperNodes; --sim starts none" >&2; exit 2; }
NEEDS=()
[[ $TLS == 1 ]] && NEEDS+=(openssl)
[[ $AUTH == 1 ]] && NEEDS+=(ssh-keygen)
for tool in "${NEEDS[@]}"; do
  command -v "$tool" >/dev/null \
    || { echo "flower-deploy: $tool not found (install it, or drop --tls/--auth)" >&2; exit 2; }
done
[[ -x "$ROOT/.venv/bin/flwr" ]] && PATH="$ROOT/.venv/bin:$PATH"
CONFIG="$(realpath "$CONFIG")"
RUN_DIR="$(realpath -m "${RUN_DIR:-runs/flower-$(date +%Y%m%d-%H%M%S)}")"
if [[ -z "$NODES" ]]; then  # validates the config before anything starts
  NODES="$(python -c 'import sys; from flora.config import load_config
c = load_config(sys.argv[1], [s for s in sys.argv[2].split(";") if s.strip()])
print(1 if c.federation.centralized else c.federation.num_clients)' "$CONFIG" "$SET")"
fi
WORK="$(mktemp -d "${TMPDIR:-/tmp}/flora-flower.XXXXXX")"
LOGS="$RUN_DIR/logs"
mkdir -p "$LOGS"

# Flower's own state and side effects stay in $WORK: no daemon, no ~/.flwr, no `uv sync`.
export FLWR_HOME="$WORK/flwr-home" FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FLWR_DISABLE_UPDATE_CHECK=1 FLWR_TELEMETRY_ENABLED=0
export FLWR_SUPEREXEC_TASK_POLL_INTERVAL="${FLWR_SUPEREXEC_TASK_POLL_INTERVAL:-0.25}"
# one share of the cores per node, unless the caller chose
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / NODES > 0 ? $(nproc) / NODES : 1 ))}"

PIDS=()
alive() { [[ -r /proc/$1/stat ]] && [[ "$(cut -d' ' -f3 "/proc/$1/stat")" != Z ]]; }
cleanup() {
  local code=$? pid
  for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do  # up to 10 s for a clean exit, then the whole group is killed
    for _ in $(seq 50); do alive "$pid" || break; sleep 0.2; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  [[ $KEEP == 1 ]] && echo "flower-deploy: work dir kept: $WORK" >&2 || rm -rf "$WORK"
  exit "$code"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start() {  # start "$log" cmd...: a new session, so its whole process group can be stopped
  local log="$1"; shift
  setsid "$@" >"$log" 2>&1 &
  PIDS+=("$!")
  echo "$!" >>"$LOGS/pids"
}

free_port() { python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

LINK_PORT="$(free_port)"
SECURITY=(--insecure) NODE_SECURITY=(--insecure) SCHEME=http CURL_TLS=()
CONNECTION="insecure = true"
if [[ $TLS == 1 ]]; then
  CERTS="$WORK/certs"; mkdir -p "$CERTS"
  openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj "/CN=flora-flower-ca" \
    -keyout "$CERTS/ca.key" -out "$CERTS/ca.crt" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" \
    -keyout "$CERTS/server.key" -out "$CERTS/server.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' >"$CERTS/san.ext"
  openssl x509 -req -in "$CERTS/server.csr" -CA "$CERTS/ca.crt" -CAkey "$CERTS/ca.key" \
    -CAcreateserial -days 1 -extfile "$CERTS/san.ext" -out "$CERTS/server.pem" 2>/dev/null
  SECURITY=(--ssl-ca-certfile "$CERTS/ca.crt" --ssl-certfile "$CERTS/server.pem"
            --ssl-keyfile "$CERTS/server.key")
  NODE_SECURITY=(--root-certificates "$CERTS/ca.crt")
  SCHEME=https CURL_TLS=(--cacert "$CERTS/ca.crt")
  CONNECTION="root-certificates = \"$CERTS/ca.crt\""
fi

LINK_ARGS=("${SECURITY[@]}" --host 127.0.0.1 --port "$LINK_PORT"
           --disable-runtime-dependency-installation)
[[ $SIM == 1 ]] && LINK_ARGS+=(--simulation)
[[ $AUTH == 1 ]] && LINK_ARGS+=(--enable-supernode-auth)
start "$LOGS/superlink.log" flower-superlink "${LINK_ARGS[@]}"
UP=0
for _ in $(seq 300); do
  curl -sf "${CURL_TLS[@]}" -o /dev/null "$SCHEME://127.0.0.1:$LINK_PORT/health" && { UP=1; break; }
  alive "${PIDS[0]}" || break
  sleep 0.2
done
[[ $UP == 1 ]] || { echo "flower-deploy: no SuperLink on port $LINK_PORT, see $LOGS" >&2; exit 1; }

mkdir -p "$FLWR_HOME"
cat >"$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "loopback"

[superlink.loopback]
address = "127.0.0.1:$LINK_PORT"
$CONNECTION
EOF

STATE="$WORK/node-state"
KEYS="$WORK/keys"
node_key() {  # node_key NAME [register]: a fresh ECDSA P-384 key pair, registered if asked
  mkdir -p "$KEYS"
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "flora-$1" -f "$KEYS/$1"
  [[ "${2:-}" == register ]] || return 0
  flwr supernode register "$KEYS/$1.pub" loopback --name "flora-$1" >>"$LOGS/register.log" 2>&1 \
    || { echo "flower-deploy: registering $1 failed, see $LOGS/register.log" >&2; exit 1; }
}
if [[ $SIM == 0 ]]; then
  SUPERNODE=(flower-supernode)
  [[ "$IDLE_POLL" != 0 ]] && SUPERNODE=(flora flower-supernode --idle-poll "$IDLE_POLL" --)
  if [[ $MODE == relay ]]; then  # one warm worker per node; wait until each listens
    for ((k = 0; k < NODES; k++)); do
      start "$LOGS/worker-$k.log" "${WORKER_CMD[@]}" --socket "$WORK/workers/node-$k.sock"
    done
    for ((k = 0; k < NODES; k++)); do
      for _ in $(seq 600); do
        [[ -S "$WORK/workers/node-$k.sock" ]] && break
        alive "${PIDS[$((k + 1))]}" || break
        sleep 0.2
      done
      [[ -S "$WORK/workers/node-$k.sock" ]] \
        || { echo "flower-deploy: worker $k did not start, see $LOGS/worker-$k.log" >&2; exit 1; }
    done
  fi
  EXECUTORS=()
  for ((k = 0; k < NODES; k++)); do
    NODE_CONFIG="partition-id=$k num-partitions=$NODES state-dir='$STATE'"
    [[ $MODE == relay ]] && NODE_CONFIG+=" worker='$WORK/workers/node-$k.sock'"
    NODE_AUTH=()
    if [[ $AUTH == 1 ]]; then
      node_key "node-$k" register
      NODE_AUTH=(--auth-supernode-private-key "$KEYS/node-$k")
    fi
    NODE_PORT="$(free_port)" ISOLATION=()
    [[ $MODE == executor ]] && ISOLATION=(--isolation process)
    start "$LOGS/supernode-$k.log" "${SUPERNODE[@]}" "${NODE_SECURITY[@]}" "${NODE_AUTH[@]}" \
      --superlink "127.0.0.1:$LINK_PORT" --host 127.0.0.1 --port "$NODE_PORT" "${ISOLATION[@]}" \
      --node-config "$NODE_CONFIG"
    if [[ $MODE == executor ]]; then  # the node's executor: its ClientApp tasks run warm here
      start "$LOGS/worker-$k.log" "${WORKER_CMD[@]}" --supernode "127.0.0.1:$NODE_PORT"
      EXECUTORS+=("${PIDS[-1]}")
    fi
  done
  for ((k = 0; k < ${#EXECUTORS[@]}; k++)); do  # ready once torch and the app are imported
    for _ in $(seq 600); do
      grep -q "executor of" "$LOGS/worker-$k.log" 2>/dev/null && break
      alive "${EXECUTORS[$k]}" || break
      sleep 0.2
    done
    grep -q "executor of" "$LOGS/worker-$k.log" 2>/dev/null \
      || { echo "flower-deploy: worker $k did not start, see $LOGS/worker-$k.log" >&2; exit 1; }
  done
  if [[ $INTRUDER == 1 ]]; then  # a key the SuperLink never saw, posing as partition 0
    node_key intruder
    start "$LOGS/intruder.log" flower-supernode "${NODE_SECURITY[@]}" \
      --auth-supernode-private-key "$KEYS/intruder" \
      --superlink "127.0.0.1:$LINK_PORT" --host 127.0.0.1 --port "$(free_port)" \
      --node-config "partition-id=0 num-partitions=$NODES state-dir='$WORK/intruder-state'"
  fi
fi

RUN_CONFIG="config='$CONFIG' run-dir='$RUN_DIR' set='$SET' state-dir='$STATE'"
FED=()
[[ $SIM == 1 ]] && FED=(--federation-config "num-supernodes=$NODES client-resources-num-cpus=1")
RUN_ID="$(flwr run "$APP" loopback --run-config "$RUN_CONFIG" "${FED[@]}" --format json \
  | python -c 'import json, sys; print(json.load(sys.stdin)["run-id"])')"
echo "flower-deploy: run $RUN_ID on 127.0.0.1:$LINK_PORT ($NODES nodes) -> $RUN_DIR" >&2

status() {
  flwr ls loopback --run-id "$RUN_ID" --format json 2>/dev/null \
    | python -c 'import json, sys; print(json.load(sys.stdin)["runs"][0]["status"])' || true
}
DEADLINE=$(( $(date +%s) + TIMEOUT ))
STATUS="" TICK=0
while [[ "$STATUS" != finished* ]]; do
  if (( $(date +%s) > DEADLINE )); then
    echo "flower-deploy: run $RUN_ID not finished after $TIMEOUT s; stopping" >&2
    flwr stop "$RUN_ID" loopback >/dev/null 2>&1 || true
    exit 124
  fi
  sleep 1
  TICK=$((TICK + 1))
  # `flwr ls` costs a Python start-up: ask often only once the ServerApp wrote its summary
  if [[ -f "$RUN_DIR/summary.json" ]] || (( TICK % 15 == 0 )); then STATUS="$(status)"; fi
done
flwr log "$RUN_ID" loopback --show >"$LOGS/run.log" 2>&1 || true
echo "flower-deploy: run $RUN_ID $STATUS" >&2
[[ "$STATUS" == "finished:completed" ]]
