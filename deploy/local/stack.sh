#!/usr/bin/env bash
# Local Clave stack without Docker: Kafka (KRaft, jars from Maven Central), SecantusDB
# (MongoDB protocol), an SMTP capture server and the four services, each one a plain
# process with a pid file under $VAR_DIR/run and a log under $VAR_DIR/log.
#
# Usage: deploy/local/stack.sh COMMAND [ARGS]
#
#   up                    start everything that is not running, wait until all is ready
#                         (PROMETHEUS=1: also a local Prometheus, see below)
#   down [--only-started] stop Prometheus, services, mail catcher, store, Kafka (only the
#                         pids in our pid files); --only-started: only what `ensure` started
#   status                one line per component; exit 0 when all run, 3 otherwise
#   ensure                like `up`, but prints "already running" when nothing is missing
#                         and records what it started in $VAR_DIR/run/started-by-ensure
#   run -- CMD [ARG...]   ensure, run CMD with the stack's environment, then stop what
#                         ensure started; exits with CMD's status (make test/demo/bench)
#   infra-up              store + Kafka (+ topics) + mail catcher only
#   services-up           the four services only (infra must be up)
#   services-down         stop the four services
#   kafka-restart         stop Kafka (SIGTERM, clean shutdown) and start it again
#   store-stop | store-start
#   store-build           only build secantusd-rs into the cache (skipped when cached)
#   start-service NAME | stop-service NAME | restart-service NAME
#   kill-service NAME     SIGKILL, no clean shutdown (NAME: a service, kafka, store, mailcatcher);
#                         after a service, the store's open transactions are aborted at once
#                         (killAllSessions; see "The store" below)
#   topics                create missing topics and ACLs, list every topic and ACL
#   kafka-fetch           only fetch the Kafka jars into the cache (skipped when complete)
#   prometheus-start | prometheus-stop
#                         start (as with PROMETHEUS=1) or stop the local Prometheus alone
#
# Components: store kafka mailcatcher identity tokens notifier password audit.
#
# Environment (defaults in brackets; relative paths are relative to the repository root):
#   VAR_DIR [var]  MAIL_DIR [$VAR_DIR/mail]  CLAVE_CACHE [~/.cache/clave] (Kafka jars,
#   the secantusd-rs build)
#   KAFKA_PORT [9092]  KAFKA_CONTROLLER_PORT [9093]  STORE_PORT [27017]
#   SMTP_HOST [127.0.0.1]  SMTP_PORT [1025]  METRICS_HOST [127.0.0.1]
#   IDENTITY_METRICS_PORT [9401] TOKENS_METRICS_PORT [9402] NOTIFIER_METRICS_PORT [9403]
#   PASSWORD_METRICS_PORT [9404] AUDIT_METRICS_PORT [9405]
#   KAFKA_BOOTSTRAP_SERVERS, MONGODB_URI: derived from the ports above unless set
#   KAFKA_HEAP_OPTS [-Xms256m -Xmx1g]  CLAVE_PYTHON [.venv/bin/python]
#   STORE_ENGINE [rs]  rs: SecantusDB's Rust server secantusd-rs; py: its Python server
#   secantusd-py (the fallback, through deploy/local/secantusd.py).  See "The store" below.
#   STORE_CACHE_SIZE [256M] (secantusd-rs's WiredTiger cache)
#   STORE_TXN_LIFETIME_S [10] (STORE_ENGINE=py only: a dead client's open transaction is
#   aborted after this idle time, instead of SecantusDB's 60 s)
#   *_READY_TIMEOUT: KAFKA [120] STORE [60] SMTP [30] SERVICE [90] PROMETHEUS [60] seconds
#   PROMETHEUS [0]  PROMETHEUS_PORT [9090]  PROMETHEUS_BIN [prometheus]
# Every process inherits this environment, so the services, the tests run through
# `run` and the infrastructure agree on addresses.
#
# Local Prometheus (optional): `PROMETHEUS=1 make up` (or PROMETHEUS=1 for `up`, `ensure`,
# `run`) also starts the machine's `prometheus` binary (Debian/Ubuntu: apt-get install -y
# prometheus) with deploy/prometheus/prometheus.yml and alerts.yml, the scrape targets
# rewritten to the *_METRICS_PORT values above ($VAR_DIR/run/prometheus.yml), data in
# $VAR_DIR/prometheus, on http://127.0.0.1:$PROMETHEUS_PORT.  If the binary is missing or
# the port is taken (the Debian package's own prometheus.service listens on 9090), it says
# so and the stack starts without it.  `status` shows it; `down` stops it.
#
# The store: SecantusDB, MongoDB wire protocol, single-node replica set "secantus", data in
# $VAR_DIR/store-data (both engines read and write the same files).  secantusd-rs is built
# once from crates.io (secantus-mdb $SECANTUS_RS_VERSION below, `cargo install --locked`,
# 4-8 min on 2 cores; needs cargo) into $CLAVE_CACHE/secantusd-rs-VERSION, like the Kafka
# jars: later starts and other clones reuse it.  Its build log: $VAR_DIR/log/store-build.log.
# secantusd-rs aborts a transaction idle for 60 s (fixed; MongoDB's default
# transactionLifetimeLimitSeconds, production sets ~15): a service killed inside one would
# block writes to the same documents for that long.  So kill-service, which knows the
# client is dead, aborts the store's open transactions at once (killAllSessions; the live
# services' transactions it aborts are retried, as any transient error).
# Kafka runs SASL/SCRAM-SHA-512 with ACLs (KRaft's StandardAuthorizer, nothing allowed
# without an ACL): one principal per service plus admin, portal, operator and auditor
# (shared/acl.py). Their random passwords are made on the first start and kept in
# $VAR_DIR/secrets/kafka/ (0600), with each principal's client settings in
# <principal>.properties (`kcat -F FILE`, or KAFKA_CLIENT_PROPERTIES=FILE for `clave`).
# Each service gets its own principal in KAFKA_SASL_USERNAME/PASSWORD; a command run by
# `run` gets KAFKA_CLIENT_PROPERTIES=.../admin.properties.
#
# Audit signing keys: on the first start of a service, an Ed25519 key pair per service is
# made in $VAR_DIR/secrets/audit (<service>.pem, mode 0600; public keys in public/). Each
# service gets its own private key only (AUDIT_SIGNING_KEY); everything else run by the
# stack (tests, the CLI) gets AUDIT_PUBLIC_KEYS, the folder of public keys, and no
# private key.
#
# Sealed portal input: on the first start of a service, Clave's X25519 key pair is made
# (deploy/local/portal_keys.py): $VAR_DIR/secrets/portal/sealing.pem (0600) goes to identity,
# tokens and password as PORTAL_SEALING_KEY; everything else gets the public key's path,
# PORTAL_SEALING_PUBLIC_KEY ($VAR_DIR/portal/sealing-public.pem), to seal to.
#
# Fault flags read by the mail catcher: $VAR_DIR/run/smtp-tempfail, smtp-permfail
# (see mailcatcher.py); `down` removes them together with the mail catcher.
# $VAR_DIR/log/stack.log gets one line per start/stop command, with its caller.
# What `ensure` started stays recorded (and is stopped by `down --only-started`) until
# a stop; `up` takes ownership of the whole stack and clears the record.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HERE=$ROOT/deploy/local
cd "$ROOT"

VAR_DIR=${VAR_DIR:-var}
mkdir -p "$VAR_DIR"
VAR_DIR=$(cd "$VAR_DIR" && pwd)
RUN_DIR=$VAR_DIR/run
LOG_DIR=$VAR_DIR/log
MAIL_DIR=${MAIL_DIR:-$VAR_DIR/mail}
KAFKA_DATA=$VAR_DIR/kafka-data
STORE_DATA=$VAR_DIR/store-data
SECRETS_DIR=$VAR_DIR/secrets/kafka
ADMIN_PROPS=$SECRETS_DIR/admin.properties
STARTED_FILE=$RUN_DIR/started-by-ensure
PROMETHEUS=${PROMETHEUS:-0}
PROMETHEUS_PORT=${PROMETHEUS_PORT:-9090}
PROMETHEUS_BIN=${PROMETHEUS_BIN:-prometheus}
PROM_DIR=$ROOT/deploy/prometheus
PROM_CONFIG=$RUN_DIR/prometheus.yml
PROM_DATA=$VAR_DIR/prometheus
mkdir -p "$RUN_DIR" "$LOG_DIR" "$MAIL_DIR"

PY=${CLAVE_PYTHON:-$ROOT/.venv/bin/python}
VENV_BIN=$(dirname "$PY")

KAFKA_PORT=${KAFKA_PORT:-9092}
KAFKA_CONTROLLER_PORT=${KAFKA_CONTROLLER_PORT:-9093}
STORE_PORT=${STORE_PORT:-27017}
STORE_ENGINE=${STORE_ENGINE:-rs}
STORE_CACHE_SIZE=${STORE_CACHE_SIZE:-256M}
# secantusd-rs: crates.io secantus-mdb at this version, built with its own Cargo.lock.
SECANTUS_RS_VERSION=0.5.3-beta.193
STORE_RS_ROOT=${CLAVE_CACHE:-$HOME/.cache/clave}/secantusd-rs-$SECANTUS_RS_VERSION
STORE_RS_BIN=$STORE_RS_ROOT/bin/secantusd-rs
STORE_RS_CONFIG=$RUN_DIR/secantusd.toml
SMTP_HOST=${SMTP_HOST:-127.0.0.1}
SMTP_PORT=${SMTP_PORT:-1025}
METRICS_HOST=${METRICS_HOST:-127.0.0.1}
KAFKA_BOOTSTRAP_SERVERS=${KAFKA_BOOTSTRAP_SERVERS:-127.0.0.1:$KAFKA_PORT}
MONGODB_URI=${MONGODB_URI:-mongodb://127.0.0.1:$STORE_PORT/?replicaSet=secantus}
# The local stack is a development machine: production mode (the default) would refuse its
# development keys, PLAINTEXT Kafka and TLS-less store and SMTP.
CLAVE_ENV=${CLAVE_ENV:-development}
export VAR_DIR MAIL_DIR SMTP_HOST SMTP_PORT METRICS_HOST KAFKA_BOOTSTRAP_SERVERS MONGODB_URI CLAVE_ENV
# Audit keys (see audit_keys below): the public keys for everyone, no private key for anyone
# but the service it belongs to.
AUDIT_KEYS_DIR=$VAR_DIR/secrets/audit
AUDIT_PUBLIC_KEYS=${AUDIT_PUBLIC_KEYS:-$AUDIT_KEYS_DIR/public}
export AUDIT_PUBLIC_KEYS
unset AUDIT_SIGNING_KEY
# Sealed portal input (deploy/local/portal_keys.py): Clave's X25519 private key for identity,
# tokens and password alone; the public key, which the portal seals to, for everyone.
PORTAL_SEALING_KEY_FILE=$VAR_DIR/secrets/portal/sealing.pem
PORTAL_SEALING_PUBLIC_KEY=${PORTAL_SEALING_PUBLIC_KEY:-$VAR_DIR/portal/sealing-public.pem}
export PORTAL_SEALING_PUBLIC_KEY
unset PORTAL_SEALING_KEY

KAFKA_POM=$HERE/kafka/pom.xml
KAFKA_LOG4J=$HERE/kafka/log4j2.yaml
KAFKA_VERSION=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$KAFKA_POM")
KAFKA_CACHE=${CLAVE_CACHE:-$HOME/.cache/clave}/kafka-$KAFKA_VERSION
KAFKA_LIBS=$KAFKA_CACHE/libs
KAFKA_PROPS=$RUN_DIR/kafka-server.properties
KAFKA_SASL_MARKER=$KAFKA_DATA/.clave-scram  # hash of the passwords the storage was formatted with
KAFKA_HEAP_OPTS=${KAFKA_HEAP_OPTS:--Xms256m -Xmx1g}
KAFKA_JVM_OPTS=${KAFKA_JVM_OPTS:--XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true}
read -r -a KAFKA_JAVA <<<"java $KAFKA_HEAP_OPTS $KAFKA_JVM_OPTS"
KAFKA_JAVA+=("-Dlog4j2.configurationFile=$KAFKA_LOG4J" "-Dkafka.logs.dir=$LOG_DIR" -cp "$KAFKA_LIBS/*")

INFRA=(store kafka mailcatcher)
SERVICES=(identity tokens notifier password audit)
ALL=("${INFRA[@]}" "${SERVICES[@]}")
STOP_ORDER=(prometheus "${SERVICES[@]}" mailcatcher store kafka)  # prometheus: optional

# ---------------------------------------------------------------------------- helpers

say() { printf '%s\n' "$*"; }
die() { printf 'stack: %s\n' "$*" >&2; exit 1; }
now_ms() { date +%s%3N; }
since() { local ms=$(($(now_ms) - $1)); printf '%d.%ds' $((ms / 1000)) $((ms % 1000 / 100)); }

is_component() { local c; for c in "${ALL[@]}"; do [[ $c == "$1" ]] && return 0; done; return 1; }
is_service() { local c; for c in "${SERVICES[@]}"; do [[ $c == "$1" ]] && return 0; done; return 1; }

# One lock per VAR_DIR so two commands never start/stop the same stack at once.
# fd 9 is closed in every process we launch, so a daemon never inherits the lock.
lock() { exec 9>"$RUN_DIR/stack.lock"; flock -w 900 9 || die "another stack.sh holds $RUN_DIR/stack.lock"; }
unlock() { exec 9>&-; }

pidfile() { printf '%s/%s.pid' "$RUN_DIR" "$1"; }

# What /proc/PID/cmdline must contain for the pid file to still be ours (pid reuse).
signature() {
  case $1 in
    kafka) printf 'kafka.Kafka' ;;
    store) printf 'secantusd' ;;  # secantusd-rs, or deploy/local/secantusd.py (STORE_ENGINE=py)
    mailcatcher) printf 'mailcatcher.py' ;;
    prometheus) printf -- '--config.file=%s' "$PROM_CONFIG" ;;
    *) printf -- '-m services.%s' "$1" ;;
  esac
}

# Alive while any of its threads is not a zombie: after SIGKILL the main thread can be a
# zombie while other threads are still exiting and holding the process's sockets.
pid_alive() {
  local pid=$1 t state
  kill -0 "$pid" 2>/dev/null || return 1
  for t in /proc/"$pid"/task/*/stat; do
    state=$(sed -E 's/.*\) ([A-Za-z]).*/\1/' "$t" 2>/dev/null) || continue
    [[ $state == [ZX] ]] || return 0
  done
  return 1
}

# Prints the pid and succeeds when the component runs under our pid file.
running_pid() {
  local file pid
  file=$(pidfile "$1")
  [[ -s $file ]] || return 1
  pid=$(<"$file")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  pid_alive "$pid" || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$(signature "$1")" || return 1
  printf '%s' "$pid"
}

metrics_port() {
  local var
  var="$(tr '[:lower:]' '[:upper:]' <<<"$1")_METRICS_PORT"
  case $1 in
    identity) printf '%s' "${!var:-9401}" ;;
    tokens) printf '%s' "${!var:-9402}" ;;
    notifier) printf '%s' "${!var:-9403}" ;;
    password) printf '%s' "${!var:-9404}" ;;
    audit) printf '%s' "${!var:-9405}" ;;
  esac
}

# host:port pairs the component listens on (checked free before a start).
listen_addrs() {
  case $1 in
    kafka) printf '127.0.0.1:%s 127.0.0.1:%s' "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT" ;;
    store) printf '127.0.0.1:%s' "$STORE_PORT" ;;
    mailcatcher) printf '%s:%s' "$SMTP_HOST" "$SMTP_PORT" ;;
    prometheus) printf '127.0.0.1:%s' "$PROMETHEUS_PORT" ;;
    *) printf '%s:%s' "$METRICS_HOST" "$(metrics_port "$1")" ;;
  esac
}

port_open() { timeout 2 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null; }

logs_of() {
  case $1 in
    kafka) printf '%s\n' "$LOG_DIR/kafka.log" "$LOG_DIR/kafka-console.log" ;;
    *) printf '%s\n' "$LOG_DIR/$1.log" ;;
  esac
}

show_logs() {
  local f
  while read -r f; do
    [[ -s $f ]] || continue
    printf '%s\n' "----- last lines of $f -----" >&2
    tail -n "${2:-40}" "$f" >&2
  done < <(logs_of "$1")
  printf '%s\n' "-----" >&2
}

need_python() {
  [[ -x $PY ]] || die "$PY not found: run 'make install' first"
}

# probe COMPONENT TIMEOUT [PID]: wait (up to TIMEOUT s) until it answers; prints a detail.
probe() {
  local c=$1 timeout=$2 pid=${3:-0}
  local args=(--timeout "$timeout" --pid "$pid")
  case $c in
    kafka) KAFKA_CLIENT_PROPERTIES=$ADMIN_PROPS "$PY" "$HERE/probe.py" kafka "$KAFKA_BOOTSTRAP_SERVERS" "${args[@]}" ;;
    store) "$PY" "$HERE/probe.py" store "$MONGODB_URI" "${args[@]}" ;;
    mailcatcher) "$PY" "$HERE/probe.py" smtp "$SMTP_HOST" "$SMTP_PORT" "${args[@]}" ;;
    prometheus)
      "$PY" "$HERE/probe.py" http "http://127.0.0.1:$PROMETHEUS_PORT/-/healthy" \
        "http://127.0.0.1:$PROMETHEUS_PORT/-/ready" "${args[@]}" ;;
    *)
      # /healthz: the process serves; /readyz: its store and broker connections work.
      local base="http://$METRICS_HOST:$(metrics_port "$c")"
      "$PY" "$HERE/probe.py" http "$base/healthz" "$base/readyz" "${args[@]}" ;;
  esac
}

ready_timeout() {
  case $1 in
    kafka) printf '%s' "${KAFKA_READY_TIMEOUT:-120}" ;;
    store) printf '%s' "${STORE_READY_TIMEOUT:-60}" ;;
    mailcatcher) printf '%s' "${SMTP_READY_TIMEOUT:-30}" ;;
    prometheus) printf '%s' "${PROMETHEUS_READY_TIMEOUT:-60}" ;;
    *) printf '%s' "${SERVICE_READY_TIMEOUT:-90}" ;;
  esac
}

stop_timeout() {
  case $1 in
    kafka) printf '60' ;;
    *) printf '20' ;;
  esac
}

# ---------------------------------------------------------------------------- Kafka

# Fetch the broker's class path once into the cache; a marker holding the POM's hash
# says the copy is complete, so later starts (and other clones) skip Maven entirely.
kafka_libs() {
  local want marker=$KAFKA_LIBS/.complete tmp t0
  want=$(sha256sum "$KAFKA_POM" | cut -d' ' -f1)
  if [[ -f $marker && $(<"$marker") == "$want" ]]; then return 0; fi
  command -v mvn >/dev/null || die "mvn not found (needed once to fetch Kafka $KAFKA_VERSION from Maven Central)"
  mkdir -p "$KAFKA_CACHE"
  (
    flock -w 900 8 || die "cannot lock $KAFKA_CACHE/.lock"
    if [[ -f $marker && $(<"$marker") == "$want" ]]; then exit 0; fi  # fetched meanwhile
    say "kafka: fetching Kafka $KAFKA_VERSION jars from Maven Central into $KAFKA_LIBS ..."
    t0=$(now_ms)
    tmp=$(mktemp -d "$KAFKA_CACHE/libs.tmp.XXXXXX")
    if ! mvn -B -q -Dstyle.color=never -f "$KAFKA_POM" dependency:copy-dependencies \
        -DincludeScope=runtime -DoutputDirectory="$tmp" >"$LOG_DIR/kafka-fetch.log" 2>&1; then
      rm -rf "$tmp"
      cat "$LOG_DIR/kafka-fetch.log" >&2
      die "mvn could not fetch the Kafka jars (log: $LOG_DIR/kafka-fetch.log)"
    fi
    [[ -f $tmp/kafka_2.13-$KAFKA_VERSION.jar ]] || { rm -rf "$tmp"; die "fetch incomplete: kafka_2.13-$KAFKA_VERSION.jar missing"; }
    if compgen -G "$tmp/slf4j-api-1.*.jar" >/dev/null; then
      rm -rf "$tmp"; die "slf4j-api 1.x on the class path: the broker would log nothing (check $KAFKA_POM)"
    fi
    printf '%s\n' "$want" >"$tmp/.complete"
    rm -rf "$KAFKA_LIBS"
    mv "$tmp" "$KAFKA_LIBS"
    say "kafka: fetched $(find "$KAFKA_LIBS" -name '*.jar' | wc -l) jars in $(since "$t0")"
  ) 8>"$KAFKA_CACHE/.lock"
}

kafka_java() { "${KAFKA_JAVA[@]}" "$@"; }

# kafka_secrets: every principal's password (made once) and client properties file, in
# $SECRETS_DIR; sets KAFKA_PRINCIPALS (from shared/acl.py, the one list of principals).
kafka_secrets() {
  local out
  out=$("$PY" "$HERE/kafka_secrets.py" "$SECRETS_DIR" "$KAFKA_BOOTSTRAP_SERVERS") \
    || die "kafka: could not write the credentials in $SECRETS_DIR"
  mapfile -t KAFKA_PRINCIPALS <<<"$out"
}

secret() { local v; v=$(<"$SECRETS_DIR/$1.password") || die "kafka: $SECRETS_DIR/$1.password missing"; printf '%s' "$v"; }

# What the storage was (or would be) formatted with: a change means the broker's SCRAM
# users and our password files disagree.
kafka_credentials_hash() {
  local p
  for p in "${KAFKA_PRINCIPALS[@]}"; do printf '%s=%s\n' "$p" "$(secret "$p")"; done | sha256sum | cut -d' ' -f1
}

kafka_prepare() {
  command -v java >/dev/null || die "java not found (Kafka needs Java 17+)"
  kafka_libs
  kafka_secrets
  local admin_pw controller_pw want p
  admin_pw=$(secret admin)
  controller_pw=$(secret controller)
  # Clients and the broker itself (inter-broker) log in with SCRAM on CLIENT; the broker logs
  # in to its own controller with PLAIN on CONTROLLER (SCRAM users live in the metadata the
  # controller serves). Super users: the broker (admin) and the controller. Holds passwords:
  # owner only.
  (
    umask 077
    cat >"$KAFKA_PROPS" <<EOF
# Written by deploy/local/stack.sh at each start: single-node KRaft, static quorum,
# SASL/SCRAM-SHA-512 and ACLs (deploy/kafka/provision.py creates them from shared/acl.py).
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$KAFKA_CONTROLLER_PORT
listeners=CLIENT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
advertised.listeners=CLIENT://127.0.0.1:$KAFKA_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=CLIENT
listener.security.protocol.map=CLIENT:SASL_PLAINTEXT,CONTROLLER:SASL_PLAINTEXT
listener.name.client.sasl.enabled.mechanisms=SCRAM-SHA-512
sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512
listener.name.client.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="admin" password="$admin_pw";
listener.name.controller.sasl.enabled.mechanisms=PLAIN
sasl.mechanism.controller.protocol=PLAIN
listener.name.controller.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required username="controller" password="$controller_pw" user_controller="$controller_pw";
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
allow.everyone.if.no.acl.found=false
super.users=User:admin;User:controller
log.dirs=$KAFKA_DATA
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
# How often retention is enforced: with segment.ms it bounds how long a portal input record
# outlives its retention (shared/topics.py). Production: 5 min (the default) or less.
log.retention.check.interval.ms=300000
EOF
  )
  want=$(kafka_credentials_hash)
  if [[ ! -f $KAFKA_DATA/meta.properties ]]; then
    local cluster_id scram=()
    mkdir -p "$KAFKA_DATA"
    cluster_id=$(kafka_java kafka.tools.StorageTool random-uuid 2>>"$LOG_DIR/kafka-console.log")
    # SCRAM users live in the metadata log: bootstrapped at format time (KIP-900), every
    # principal at once, so the broker and each client can log in from the first start.
    for p in "${KAFKA_PRINCIPALS[@]}"; do
      scram+=(--add-scram "SCRAM-SHA-512=[name=$p,password=$(secret "$p")]")
    done
    say "kafka: formatting $KAFKA_DATA (cluster id $cluster_id, ${#KAFKA_PRINCIPALS[@]} SCRAM users)"
    kafka_java kafka.tools.StorageTool format -t "$cluster_id" -c "$KAFKA_PROPS" "${scram[@]}" \
      >>"$LOG_DIR/kafka-console.log" 2>&1 || { show_logs kafka; die "kafka: storage format failed"; }
    printf '%s\n' "$want" >"$KAFKA_SASL_MARKER"
  elif [[ ! -f $KAFKA_SASL_MARKER ]]; then
    die "kafka: $KAFKA_DATA was formatted without SCRAM users (a stack from before Kafka ACLs); start afresh: rm -rf $KAFKA_DATA $STORE_DATA (the audit chain spans both)"
  elif [[ $(<"$KAFKA_SASL_MARKER") != "$want" ]]; then
    die "kafka: the passwords in $SECRETS_DIR are not those $KAFKA_DATA was formatted with (files removed, or principals added); start afresh: rm -rf $KAFKA_DATA $STORE_DATA"
  fi
}

# ---------------------------------------------------------------------------- store

STORE_RS_MARK="secantus-mdb $SECANTUS_RS_VERSION --locked"

# Which engine the store process PID runs, from its command line.
store_engine_of() {
  if tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -qF 'secantusd-rs'; then
    printf 'secantusd-rs'
  else
    printf 'secantusd-py'
  fi
}

# The cached secantusd-rs is complete: its marker names this version (written last).
store_rs_cached() {
  [[ -x $STORE_RS_BIN && -f $STORE_RS_ROOT/.complete && $(<"$STORE_RS_ROOT/.complete") == "$STORE_RS_MARK" ]]
}

# A root installed by hand with the same `cargo install ... --root` (no marker) is taken
# once cargo has recorded the install and the binary answers with this version.
store_rs_adopt() {
  [[ -x $STORE_RS_BIN ]] || return 1
  grep -qF "\"secantus-mdb $SECANTUS_RS_VERSION (registry+" "$STORE_RS_ROOT/.crates2.json" 2>/dev/null || return 1
  [[ $("$STORE_RS_BIN" --version 2>/dev/null | head -n 1) == "secantusd-rs $SECANTUS_RS_VERSION" ]] || return 1
  printf '%s\n' "$STORE_RS_MARK" >"$STORE_RS_ROOT/.complete"
  say "store: using secantusd-rs $SECANTUS_RS_VERSION already installed in $STORE_RS_ROOT"
}

# Build secantusd-rs once into the cache (like the Kafka jars): a lock so two builds never
# race, a build in a temporary root moved into place with its marker when complete.
store_rs_build() {
  local log=$LOG_DIR/store-build.log
  store_rs_cached && return 0
  mkdir -p "$(dirname "$STORE_RS_ROOT")"
  (
    local tmp t0 got rc=0 ticker self=$BASHPID
    flock -w 1800 8 || die "cannot lock $STORE_RS_ROOT.lock (another secantusd-rs build has run for 30 min)"
    store_rs_cached && exit 0  # built meanwhile
    store_rs_adopt && exit 0
    command -v cargo >/dev/null || die "cargo not found: secantusd-rs $SECANTUS_RS_VERSION is built once from \
crates.io with Rust's cargo (https://rustup.rs, or Debian's cargo package). Or run the Python \
store instead: STORE_ENGINE=py"
    rm -rf "$STORE_RS_ROOT".tmp.*  # what an interrupted build left (we hold the lock)
    tmp=$(mktemp -d "$STORE_RS_ROOT.tmp.XXXXXX")
    chmod 755 "$tmp"  # mktemp's 0700 would outlive the rename
    say "store: building secantusd-rs $SECANTUS_RS_VERSION with cargo, once (4-8 min on 2 cores; log: $log) ..."
    t0=$(now_ms)
    # A line every 30 s, so a long quiet step does not look hung (stops with this shell).
    (
      while sleep 30 >/dev/null 2>&1 && kill -0 "$self" 2>/dev/null; do
        say "store: still building ($(grep -c '^ *Compiling ' "$log" 2>/dev/null) crates compiled, $(since "$t0"))"
      done
    ) 8>&- 9>&- &
    ticker=$!
    cargo install secantus-mdb --version "$SECANTUS_RS_VERSION" --locked --ignore-rust-version \
      --root "$tmp" </dev/null >"$log" 2>&1 9>&- || rc=$?
    kill "$ticker" 2>/dev/null || true
    if ((rc != 0)); then
      rm -rf "$tmp"
      tail -n 25 "$log" >&2
      die "cargo could not build secantusd-rs $SECANTUS_RS_VERSION (exit $rc; log: $log). Or run the Python store: STORE_ENGINE=py"
    fi
    got=$("$tmp/bin/secantusd-rs" --version 2>&1 | head -n 1) || true
    [[ $got == "secantusd-rs $SECANTUS_RS_VERSION" ]] || { rm -rf "$tmp"; die "the build gave '$got', not secantusd-rs $SECANTUS_RS_VERSION"; }
    printf '%s\n' "$STORE_RS_MARK" >"$tmp/.complete"
    rm -rf "$STORE_RS_ROOT"
    mv "$tmp" "$STORE_RS_ROOT"
    say "store: built secantusd-rs $SECANTUS_RS_VERSION in $(since "$t0") into $STORE_RS_ROOT"
  ) 8>"$STORE_RS_ROOT.lock"
}

# Sets CMD for the store of STORE_ENGINE (building secantusd-rs first when not cached).
store_command() {
  case $STORE_ENGINE in
    rs)
      store_rs_build
      # Every setting is on the command line; naming a config file stops secantusd-rs from
      # reading ./secantusd.toml, ~/.secantus/ or /etc/secantus/.
      printf '# Written by deploy/local/stack.sh: every setting is on the command line.\n' >"$STORE_RS_CONFIG"
      CMD=("$STORE_RS_BIN" --config "$STORE_RS_CONFIG" --host 127.0.0.1 --port "$STORE_PORT"
        --storage-path "$STORE_DATA" --cache-size "$STORE_CACHE_SIZE" --log-level INFO) ;;
    py)
      [[ -x $VENV_BIN/secantusd-py ]] || die "$VENV_BIN/secantusd-py not found: run 'make install'"
      # secantusd-py through a launcher: shorter transaction lifetime, O(N) paths fixed.
      CMD=("$PY" "$HERE/secantusd.py" --host 127.0.0.1 --port "$STORE_PORT"
        --storage-path "$STORE_DATA" --log-level WARNING) ;;
    *) die "STORE_ENGINE=$STORE_ENGINE: expected rs (secantusd-rs, the default) or py (secantusd-py)" ;;
  esac
}

# A running store of the other engine is kept (its data is the same): say so.
store_engine_check() {
  local pid running
  pid=$(running_pid store) || return 0
  running=$(store_engine_of "$pid")
  [[ $running == "secantusd-$STORE_ENGINE" ]] \
    || say "store: note: $running runs (pid $pid), not STORE_ENGINE=$STORE_ENGINE; to switch: stack.sh store-stop, then start again"
}

# After a service was SIGKILLed: abort the store's open transactions now (the dead
# service's among them) rather than when secantusd-rs's fixed 60 s lifetime runs out.
store_release_sessions() {
  local out
  running_pid store >/dev/null || return 0
  if out=$("$PY" "$HERE/storectl.py" kill-sessions "$MONGODB_URI" 2>&1); then
    say "store: $out"
  else
    say "store: warning: could not abort the open transactions ($out); a dead client's ends within 60 s"
  fi
}

# ---------------------------------------------------------------------------- audit keys

# audit_keys: make the missing signing keys, one Ed25519 key pair per service, kept across
# restarts (the log keeps their signatures forever): $AUDIT_KEYS_DIR/<service>.pem (0600, in
# a 0700 folder) and its public key in $AUDIT_PUBLIC_KEYS/<service>-<kid>.json.
audit_keys() {
  local s missing=()
  for s in "${SERVICES[@]}"; do
    if [[ ! -s $AUDIT_KEYS_DIR/$s.pem ]] || ! compgen -G "$AUDIT_PUBLIC_KEYS/$s-*.json" >/dev/null; then
      missing+=("$s")
    fi
  done
  ((${#missing[@]})) || return 0
  need_python
  (umask 077 && mkdir -p "$AUDIT_KEYS_DIR" && chmod 700 "$AUDIT_KEYS_DIR")
  "$PY" -m clave.cli audit keygen "${missing[@]}" --key-dir "$AUDIT_KEYS_DIR" --public-dir "$AUDIT_PUBLIC_KEYS" \
    || die "audit keys: could not make the signing keys of ${missing[*]}"
}

# audit_env SERVICE: what that service alone gets on top of the stack's environment.
audit_env() { printf 'AUDIT_SIGNING_KEY=%s' "$AUDIT_KEYS_DIR/$1.pem"; }

# portal_keys: Clave's sealing key pair for portal input, made once (kept across restarts).
portal_keys() { "$PY" "$HERE/portal_keys.py" "$VAR_DIR" || die "portal sealing key: could not make it"; }

# portal_env SERVICE: the sealing private key, for the services that open portal input.
portal_env() {
  case $1 in
    identity | tokens | password) printf 'PORTAL_SEALING_KEY=%s' "$PORTAL_SEALING_KEY_FILE" ;;
    *) printf 'PORTAL_SEALING_KEY=' ;;
  esac
}

# ---------------------------------------------------------------------------- start / stop

command_of() {
  case $1 in
    kafka) CMD=("${KAFKA_JAVA[@]}" kafka.Kafka "$KAFKA_PROPS") ;;
    store) store_command ;;
    mailcatcher) CMD=("$PY" "$HERE/mailcatcher.py") ;;
    prometheus)
      CMD=("$PROMETHEUS_BIN" "--config.file=$PROM_CONFIG" "--storage.tsdb.path=$PROM_DATA"
        "--web.listen-address=127.0.0.1:$PROMETHEUS_PORT") ;;
    *)
      # The service's own audit signing key (audit_env), and its own Kafka principal in the
      # variables shared/settings.py reads: the password goes from its file into the
      # environment (owner-readable), never on a command line; an inherited
      # KAFKA_CLIENT_PROPERTIES (a test's admin file) must not override it.
      CMD=(env "$(audit_env "$1")" "$(portal_env "$1")"
        bash -c "$SERVICE_KAFKA_ENV" clave-kafka-env "$SECRETS_DIR/$1.password" "$1" "$PY" -m "services.$1") ;;
  esac
}

# $1 password file, $2 principal, then the command.
# shellcheck disable=SC2016
SERVICE_KAFKA_ENV='unset KAFKA_CLIENT_PROPERTIES
KAFKA_SASL_PASSWORD=$(<"$1") || exit 1
export KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT KAFKA_SASL_MECHANISM=SCRAM-SHA-512 KAFKA_SASL_USERNAME=$2 KAFKA_SASL_PASSWORD
shift 2
exec "$@"'

# await_exec COMPONENT PID: $! is first a copy of this shell, forked to run the command,
# and is the component only once that copy has exec'd it; from then on /proc/PID/cmdline
# carries the component's signature. Wait for that (or for its end), with a deadline, so the
# pid file is written only when running_pid can trust it: read too early, a starting
# component looked like one that had already exited.
await_exec() {
  local c=$1 pid=$2 sig deadline
  sig=$(signature "$c")
  deadline=$(($(now_ms) + 10000))
  while pid_alive "$pid"; do
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$sig" && return 0
    if (($(now_ms) > deadline)); then
      say "$c: pid $pid has not started its command within 10s"
      return 0
    fi
    sleep 0.01
  done
}

# launch COMPONENT: start it in the background (own session, so a Ctrl-C in the
# terminal that ran `make up` does not reach it) and write its pid file once the pid is
# the component's own process.
launch() {
  local c=$1 addr log pid
  for addr in $(listen_addrs "$c"); do
    if port_open "${addr%:*}" "${addr##*:}"; then
      die "$c: $addr is already in use by a process this stack did not start (see: ss -ltnp | grep ${addr##*:}); stop it or choose other ports"
    fi
  done
  case $c in
    kafka) kafka_prepare; mkdir -p "$KAFKA_DATA"; log=$LOG_DIR/kafka-console.log ;;
    store) mkdir -p "$STORE_DATA"; log=$LOG_DIR/store.log ;;
    prometheus) prometheus_config; mkdir -p "$PROM_DATA"; log=$LOG_DIR/prometheus.log ;;
    *) audit_keys; portal_keys; log=$LOG_DIR/$c.log ;;
  esac
  command_of "$c"
  printf '===== %s starting %s =====\n' "$(date -u +%FT%TZ)" "$c" >>"$log"
  PYTHONUNBUFFERED=1 setsid "${CMD[@]}" </dev/null >>"$log" 2>&1 9>&- &
  pid=$!
  await_exec "$c" "$pid"
  printf '%s\n' "$pid" >"$(pidfile "$c")"
}

# start_one COMPONENT: launches it unless it already runs (then appends it to STARTED,
# and to the ensure record when RECORD is set).  Never called in a condition, so that
# `set -e` stays in force inside.
start_one() {
  local c=$1 pid
  if pid=$(running_pid "$c"); then
    say "$c: already running (pid $pid)"
    return 0
  fi
  rm -f "$(pidfile "$c")"
  if [[ -n ${RECORD:-} ]]; then printf '%s\n' "$c" >>"$STARTED_FILE"; fi
  launch "$c"
  STARTED+=("$c")
}

# wait_ready COMPONENT T0: waits for readiness; on failure shows its log and exits 1.
wait_ready() {
  local c=$1 t0=$2 pid detail rc=0
  pid=$(running_pid "$c") || { show_logs "$c"; die "$c: exited right after start"; }
  detail=$(probe "$c" "$(ready_timeout "$c")" "$pid") || rc=$?
  if ((rc != 0)); then
    show_logs "$c"
    if ((rc == 2)); then die "$c: exited before it was ready - $detail"; fi
    die "$c: not ready within $(ready_timeout "$c")s ($detail); pid $pid left running, 'stack.sh down' stops it"
  fi
  say "$c: ready (pid $pid, $(since "$t0")) - $detail"
}

# start COMPONENT...: launch all that are missing, then wait for each of them.
start() {
  local c t0
  t0=$(now_ms)
  STARTED=()
  for c in "$@"; do start_one "$c"; done
  for c in "$@"; do wait_ready "$c" "$t0"; done
}

# Topics and ACLs, as admin (the same script provisions a production cluster).
create_topics() {
  local t0
  t0=$(now_ms)
  KAFKA_CLIENT_PROPERTIES=$ADMIN_PROPS "$PY" "$ROOT/deploy/kafka/provision.py" --replication-factor 1 "$@" \
    || die "topic or ACL provisioning failed"
  say "topics and ACLs: done in $(since "$t0")"
}

infra_up() {
  local c kafka_started=0
  need_python
  kafka_secrets  # the services need their passwords even when Kafka is already running
  start "${INFRA[@]}"
  store_engine_check
  for c in "${STARTED[@]}"; do [[ $c == kafka ]] && kafka_started=1; done
  if ((kafka_started)) || [[ ${1:-} == always-topics ]]; then create_topics; fi
}

services_up() {
  need_python
  start "${SERVICES[@]}"
}

# stop COMPONENT...: stops them tier by tier in STOP_ORDER - the services (together),
# then the mail catcher, the store, Kafka - so each tier shuts down cleanly while
# what it talks to is still up.  SIGTERM, wait up to the tier's deadline, then
# SIGKILL.  Only pids from our pid files are ever signalled.
stop() {
  local tier c
  local -a members
  for tier in prometheus services mailcatcher store kafka; do
    members=()
    for c in "$@"; do
      if [[ $tier == services ]] && is_service "$c" || [[ $c == "$tier" ]]; then members+=("$c"); fi
    done
    ((${#members[@]})) && stop_together "${members[@]}"
  done
  return 0
}

stop_together() {
  local c pid deadline left
  local -A pids=()
  for c in "$@"; do
    if pid=$(running_pid "$c"); then
      pids[$c]=$pid
      kill -TERM "$pid" 2>/dev/null || true
    else
      rm -f "$(pidfile "$c")"
    fi
  done
  for c in "$@"; do
    [[ -n ${pids[$c]:-} ]] || continue
    pid=${pids[$c]}
    deadline=$(($(date +%s) + $(stop_timeout "$c")))
    while pid_alive "$pid" && (($(date +%s) < deadline)); do sleep 0.1; done
    if pid_alive "$pid"; then
      say "$c: still running $(stop_timeout "$c")s after SIGTERM, sending SIGKILL (pid $pid)"
      kill -KILL "$pid" 2>/dev/null || true
      left=50
      while pid_alive "$pid" && ((left-- > 0)); do sleep 0.1; done
    fi
    rm -f "$(pidfile "$c")"
    say "$c: stopped (pid $pid)"
    if [[ $c == mailcatcher ]]; then rm -f "$RUN_DIR/smtp-tempfail" "$RUN_DIR/smtp-permfail"; fi
  done
}

kill_one() {
  local c=$1 pid left=100 addr
  if pid=$(running_pid "$c"); then
    kill -KILL "$pid" 2>/dev/null || true
    while pid_alive "$pid" && ((left-- > 0)); do sleep 0.05; done
    # A start right after must find the ports free (launch refuses a port in use).
    for addr in $(listen_addrs "$c"); do
      left=100
      while port_open "${addr%:*}" "${addr##*:}" && ((left-- > 0)); do sleep 0.05; done
    done
    rm -f "$(pidfile "$c")"
    say "$c: killed (SIGKILL, pid $pid)"
  else
    rm -f "$(pidfile "$c")"
    say "$c: not running"
  fi
}

# Components in stop order, keeping only those named in the arguments.
in_stop_order() {
  local c w
  for c in "${STOP_ORDER[@]}"; do
    for w in "$@"; do [[ $c == "$w" ]] && { printf '%s\n' "$c"; break; }; done
  done
}

all_running() {
  local c
  for c in "${ALL[@]}"; do running_pid "$c" >/dev/null || return 1; done
}

# ---------------------------------------------------------------------------- Prometheus

# deploy/prometheus/prometheus.yml scrapes the default metrics ports: write a copy whose
# targets are the ports this stack really uses, with the rule files found next to the original.
prometheus_config() {
  local c var default host map=""
  host=$METRICS_HOST
  [[ $host == 0.0.0.0 ]] && host=127.0.0.1
  for c in "${SERVICES[@]}"; do
    var="$(tr '[:lower:]' '[:upper:]' <<<"$c")_METRICS_PORT"
    default=$(unset "$var"; metrics_port "$c")
    grep -qF "\"127.0.0.1:$default\"" "$PROM_DIR/prometheus.yml" \
      || say "prometheus: warning: $PROM_DIR/prometheus.yml has no target 127.0.0.1:$default ($c is not scraped)"
    map+=" 127.0.0.1:$default=$host:$(metrics_port "$c")"
  done
  awk -v dir="$PROM_DIR" -v map="$map" '
    BEGIN { n = split(map, pairs, " "); for (i = 1; i <= n; i++) { split(pairs[i], kv, "="); to[kv[1]] = kv[2] } }
    /^rule_files:/ { rules = 1; print; next }
    /^[^[:space:]#]/ { rules = 0 }
    rules && /^[[:space:]]*-[[:space:]]*[^[:space:]\/#]/ { sub(/-[[:space:]]*/, "- " dir "/") }
    { for (from in to) gsub("\"" from "\"", "\"" to[from] "\""); print }
  ' "$PROM_DIR/prometheus.yml" >"$PROM_CONFIG.tmp"
  mv "$PROM_CONFIG.tmp" "$PROM_CONFIG"
}

# prometheus_up: start the local Prometheus when PROMETHEUS=1.  Optional: a missing binary,
# a taken port or a failed start is reported and the stack goes on without it.
prometheus_up() {
  local pid t0 detail rc=0 owner
  [[ $PROMETHEUS == 1 ]] || return 0
  if pid=$(running_pid prometheus); then
    say "prometheus: already running (pid $pid)"
    return 0
  fi
  if ! command -v "$PROMETHEUS_BIN" >/dev/null; then
    say "prometheus: '$PROMETHEUS_BIN' not found, continuing without it. To install it (Debian/Ubuntu):"
    say "  sudo apt-get install -y prometheus   # then, if its own service took port 9090:"
    say "  sudo systemctl disable --now prometheus   (or choose another PROMETHEUS_PORT)"
    return 0
  fi
  if port_open 127.0.0.1 "$PROMETHEUS_PORT"; then
    owner=$(ss -ltnpH "sport = :$PROMETHEUS_PORT" 2>/dev/null | grep -o 'users:.*' | head -n 1) || true
    say "prometheus: 127.0.0.1:$PROMETHEUS_PORT is already in use by a process this stack did not start" \
      "(${owner:-see: ss -ltnp | grep $PROMETHEUS_PORT}); continuing without ours."
    if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
      say "  The prometheus package's own service is active: sudo systemctl disable --now prometheus"
    fi
    say "  Or choose another port: PROMETHEUS_PORT=19090 PROMETHEUS=1 make up"
    return 0
  fi
  t0=$(now_ms)
  start_one prometheus
  if ! pid=$(running_pid prometheus); then
    show_logs prometheus
    say "prometheus: exited right after start, continuing without it"
    return 0
  fi
  detail=$(probe prometheus "$(ready_timeout prometheus)" "$pid") || rc=$?
  if ((rc != 0)); then
    show_logs prometheus
    say "prometheus: not ready ($detail); stopping it, continuing without it"
    stop prometheus
    return 0
  fi
  say "prometheus: ready (pid $pid, $(since "$t0")) - http://127.0.0.1:$PROMETHEUS_PORT/targets"
}

# ---------------------------------------------------------------------------- commands

cmd_up() {
  RECORD=""
  infra_up always-topics
  services_up
  prometheus_up
  rm -f "$STARTED_FILE"  # whoever ran `up` owns the whole stack now
  summary
}

cmd_ensure() {
  local t0 c
  t0=$(now_ms)
  need_python
  if all_running; then
    # Running: still make sure everything answers (it may be booting right now).
    for c in "${ALL[@]}"; do
      probe "$c" "$(ready_timeout "$c")" "$(running_pid "$c")" >/dev/null \
        || { show_logs "$c"; die "$c: running but not answering"; }
    done
    RECORD=1 prometheus_up
    say "already running"
    return 0
  fi
  RECORD=1
  infra_up
  services_up
  prometheus_up
  RECORD=""
  say "stack: ready in $(since "$t0"); started by ensure: $(sort -u "$STARTED_FILE" 2>/dev/null | tr '\n' ' ')"
}

cmd_down() {
  local targets=()
  if [[ ${1:-} == --only-started ]]; then
    if [[ ! -s $STARTED_FILE ]]; then
      say "nothing was started by ensure"
      rm -f "$STARTED_FILE"
      return 0
    fi
    mapfile -t targets < <(in_stop_order $(sort -u "$STARTED_FILE"))
  else
    targets=("${STOP_ORDER[@]}")
  fi
  stop "${targets[@]}"
  rm -f "$STARTED_FILE"
}

cmd_status() {
  local c pid detail all=0
  for c in "${ALL[@]}"; do
    if pid=$(running_pid "$c"); then
      if [[ -x $PY ]] && detail=$(probe "$c" 0 2>/dev/null); then
        [[ $c == store ]] && detail+=" ($(store_engine_of "$pid"))"
        printf '%-12s running (pid %s) - %s\n' "$c" "$pid" "$detail"
      else
        printf '%-12s running (pid %s) - NOT ANSWERING: %s\n' "$c" "$pid" "${detail:-no probe}"
        all=1
      fi
    elif [[ -s $(pidfile "$c") ]]; then
      printf '%-12s stopped - exited on its own or was killed (stale pid file; see %s)\n' \
        "$c" "$(logs_of "$c" | head -n 1)"
      all=1
    else
      printf '%-12s stopped\n' "$c"
      all=1
    fi
  done
  # Optional: counts against the exit status only when it should run (PROMETHEUS=1 or
  # started and died).
  if pid=$(running_pid prometheus); then
    if [[ -x $PY ]] && detail=$(probe prometheus 0 2>/dev/null); then
      printf '%-12s running (pid %s) - http://127.0.0.1:%s\n' prometheus "$pid" "$PROMETHEUS_PORT"
    else
      printf '%-12s running (pid %s) - NOT ANSWERING: %s\n' prometheus "$pid" "${detail:-no probe}"
      all=1
    fi
  elif [[ -s $(pidfile prometheus) ]]; then
    printf '%-12s stopped - exited on its own or was killed (stale pid file; see %s)\n' \
      prometheus "$LOG_DIR/prometheus.log"
    all=1
  elif [[ $PROMETHEUS == 1 ]]; then
    printf '%-12s stopped\n' prometheus
    all=1
  else
    printf '%-12s not started (optional: PROMETHEUS=1 make up)\n' prometheus
  fi
  [[ -s $STARTED_FILE ]] && printf 'started by ensure: %s\n' "$(sort -u "$STARTED_FILE" | tr '\n' ' ')"
  ((all == 0)) || return 3
}

cmd_run() {
  [[ ${1:-} == -- ]] && shift
  (($# > 0)) || die "usage: stack.sh run -- COMMAND [ARG...]"
  local rc=0 self=${BASH_SOURCE[0]}
  # Ctrl-C reaches ensure / the command (same process group) and stops them; this
  # script only has to survive it to clean up.
  trap 'say "stack: interrupted, cleaning up" >&2' INT TERM
  # ensure and down run as their own stack.sh processes (each takes the lock), so the
  # command in between may call stack.sh itself (fault tests restart components).
  if ! "$self" ensure; then
    say "stack: ensure failed; stopping what it started" >&2
    "$self" down --only-started || true
    exit 1
  fi
  # The command (tests, demo, bench) observes as admin; it takes another principal's
  # properties file where it plays the portal, an operator or an auditor.
  KAFKA_CLIENT_PROPERTIES=$ADMIN_PROPS "$@" || rc=$?
  "$self" down --only-started || true
  exit "$rc"
}

summary() {
  local c pid
  say ""
  say "Clave local stack is up."
  say "  KAFKA_BOOTSTRAP_SERVERS=$KAFKA_BOOTSTRAP_SERVERS (SASL/SCRAM; client settings per principal:"
  say "    $SECRETS_DIR/<principal>.properties, e.g. KAFKA_CLIENT_PROPERTIES=$SECRETS_DIR/operator.properties clave ...)"
  say "  MONGODB_URI=$MONGODB_URI"
  say "  SMTP: $SMTP_HOST:$SMTP_PORT  captured mail (.eml): $MAIL_DIR"
  for c in "${SERVICES[@]}"; do
    say "  $c: http://$METRICS_HOST:$(metrics_port "$c")/metrics"
  done
  if pid=$(running_pid prometheus); then
    say "  prometheus: http://127.0.0.1:$PROMETHEUS_PORT (config $PROM_CONFIG, data $PROM_DATA)"
  else
    say "  prometheus: not running (PROMETHEUS=1 make up starts one)"
  fi
  say "  logs: $LOG_DIR   pids: $RUN_DIR   stop: make down"
}

need_component() {
  [[ -n ${1:-} ]] && is_component "$1" || die "expected a component name: ${ALL[*]}"
}

# One line per command that starts or stops something, with its caller: who stopped
# my services? is answered by var/log/stack.log.
audit_line() {
  local caller
  caller=$(tr '\0' ' ' <"/proc/$PPID/cmdline" 2>/dev/null | cut -c1-160) || caller="?"
  printf '%s pid=%s stack.sh %s (caller pid=%s: %s)\n' \
    "$(date -u +%FT%T.%3NZ)" "$$" "$*" "$PPID" "$caller" >>"$LOG_DIR/stack.log"
}

main() {
  local cmd=${1:-help}
  shift || true
  case $cmd in status | topics | help | -h | --help) ;; *) audit_line "$cmd" "$@" ;; esac
  case $cmd in
    up) lock; cmd_up ;;
    down) lock; cmd_down "$@" ;;
    status) cmd_status ;;
    ensure) lock; cmd_ensure ;;
    run) cmd_run "$@" ;;
    infra-up) lock; infra_up always-topics ;;
    services-up) lock; services_up ;;
    services-down) lock; stop "${SERVICES[@]}" ;;
    kafka-restart) lock; need_python; stop kafka; start kafka ;;
    store-stop) lock; stop store ;;
    store-start) lock; need_python; start store ;;
    start-service) need_component "${1:-}"; lock; need_python; start "$1" ;;
    stop-service) need_component "${1:-}"; lock; stop "$1" ;;
    restart-service) need_component "${1:-}"; lock; need_python; stop "$1"; start "$1" ;;
    kill-service)
      need_component "${1:-}"; lock; kill_one "$1"
      if is_service "$1"; then store_release_sessions; fi ;;
    topics) need_python; create_topics --describe ;;
    kafka-fetch) kafka_libs; say "kafka: jars in $KAFKA_LIBS" ;;
    store-build) store_rs_build; say "store: secantusd-rs in $STORE_RS_BIN" ;;
    prometheus-start) lock; need_python; PROMETHEUS=1 prometheus_up ;;
    prometheus-stop) lock; stop prometheus ;;
    help | -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' ;;
    *) die "unknown command '$cmd' (try: stack.sh help)" ;;
  esac
}

# Sourced (tests/unit/test_stack_start.py): the functions only.
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then main "$@"; fi
