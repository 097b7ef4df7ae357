#!/usr/bin/env bash
# engineforge "team stack" on one Debian 12 machine (run as root), real components only:
#   Slurm 22.05 (munge, slurmctld, slurmd, slurmdbd on MariaDB), PostgreSQL, Ceph (mon, one
#   bluestore OSD on a sparse file, radosgw = S3) and an MLflow tracking server (PostgreSQL
#   backend, artifacts proxied to S3, so clients need only MLFLOW_TRACKING_URI).
# Every daemon listens on 127.0.0.1 on a fixed port (env-overridable), runs detached (setsid,
# stdin from /dev/null), logs to $STATE/logs/<service>.log and is stopped by its pid in
# $STATE/pids/<service>.pid. Measured settings and pitfalls: shared/DEPENDENCIES.md,
# "Team-scale stack on one Debian 12 machine".
#
# usage: stack.sh up | down [--purge] | start SERVICE | stop SERVICE | status | env
#   services: munge mariadb slurmdbd slurmctld slurmd postgres ceph-mon ceph-osd radosgw mlflow
# Clients: `source "$(stack.sh env)"`. Secrets live only in $STATE/secrets.env and
# $STATE/stack.env (mode 600) and the Slurm/DB config files (mode 600); never on the terminal.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
S=${ENGINEFORGE_STACK_DIR:-/tmp/engineforge-stack}
VENV=${ENGINEFORGE_STACK_VENV:-$REPO/.venv}
HOST=$(hostname -s)

PG_PORT=${ENGINEFORGE_STACK_PG_PORT:-55432}
MARIADB_PORT=${ENGINEFORGE_STACK_MARIADB_PORT:-53306}
RGW_PORT=${ENGINEFORGE_STACK_RGW_PORT:-57480}
MLFLOW_PORT=${ENGINEFORGE_STACK_MLFLOW_PORT:-55000}
SLURMCTLD_PORT=${ENGINEFORGE_STACK_SLURMCTLD_PORT:-56817}
SLURMD_PORT=${ENGINEFORGE_STACK_SLURMD_PORT:-56818}
SLURMDBD_PORT=${ENGINEFORGE_STACK_SLURMDBD_PORT:-56819}
MON_PORT=${ENGINEFORGE_STACK_MON_PORT:-56789}      # msgr1; msgr2 is MON_PORT+1
MON2_PORT=$((MON_PORT + 1))
CEPH_PORTS=${ENGINEFORGE_STACK_CEPH_PORTS:-56800-56899}  # OSD messenger ports
ART_BUCKET=${ENGINEFORGE_STACK_ARTIFACT_BUCKET:-engineforge-artifacts}
STORE_BUCKET=${ENGINEFORGE_STACK_STORAGE_BUCKET:-engineforge-storage}
CLUSTER=engineforge
WAIT=${ENGINEFORGE_STACK_WAIT:-120}   # seconds a service may take to become healthy

SERVICES=(munge mariadb slurmdbd slurmctld slurmd postgres ceph-mon ceph-osd radosgw mlflow)
PKGS=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server mariadb-client postgresql
      ceph-mon ceph-osd ceph-common radosgw curl iproute2)
PIP_PKGS=(psycopg2-binary boto3 snakemake-executor-plugin-slurm snakemake-storage-plugin-s3)
PIP_MODS=(psycopg2 boto3 snakemake_executor_plugin_slurm snakemake_storage_plugin_s3)

# Slurm config lives at the default /etc/slurm so plain sbatch/squeue/sacct work without
# SLURM_CONF; cgroup.conf and slurmdbd.conf must sit beside slurm.conf.
SLURM_ETC=/etc/slurm
MARK="# written by engineforge workflow/stack/stack.sh"
# munged's socket stays at Debian's default: sacctmgr/sacct reach slurmdbd with a credential
# from the default socket whatever AuthInfo says (seen with 22.05), so a private one breaks them.
MUNGE_SOCK=/run/munge/munge.socket.2
export CEPH_CONF=$S/ceph/ceph.conf

T0=$EPOCHREALTIME
say() { printf 'stack: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }
elapsed() { awk -v a="$T0" -v b="$EPOCHREALTIME" 'BEGIN{printf "%.1f", b-a}'; }
log() { echo "$S/logs/$1.log"; }

# ---------------------------------------------------------------- per-service facts
port_of() {
  case $1 in
    munge) echo "$MUNGE_SOCK" ;; mariadb) echo "$MARIADB_PORT" ;;
    slurmdbd) echo "$SLURMDBD_PORT" ;; slurmctld) echo "$SLURMCTLD_PORT" ;;
    slurmd) echo "$SLURMD_PORT" ;; postgres) echo "$PG_PORT" ;;
    ceph-mon) echo "$MON_PORT,$MON2_PORT" ;; ceph-osd) echo "$CEPH_PORTS" ;;
    radosgw) echo "$RGW_PORT" ;; mlflow) echo "$MLFLOW_PORT" ;;
    *) die "unknown service '$1' (one of: ${SERVICES[*]})" ;;
  esac
}
comm_of() {  # /proc/<pid>/comm of the service's main process (guards against pid reuse)
  case $1 in
    munge) echo munged ;; mariadb) echo mariadbd ;; postgres) echo postgres ;; *) echo "$1" ;;
  esac
}

pid_of() { cat "$S/pids/$1.pid" 2>/dev/null || true; }
# A daemon's parent is init once stack.sh exits; an init that reaps late leaves a zombie that
# `kill -0` still finds, so a zombie counts as gone.
pid_running() {
  kill -0 "$1" 2>/dev/null && [[ $(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null) != Z* ]]
}
alive() {
  local pid; pid=$(pid_of "$1")
  [[ -n $pid ]] && pid_running "$pid" &&
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$(comm_of "$1")" ]]
}
listening() { ss -ltnH "sport = :$1" 2>/dev/null | grep -q .; }

healthy() {
  case $1 in
    munge) munge -n -S "$MUNGE_SOCK" 2>/dev/null | unmunge -S "$MUNGE_SOCK" >/dev/null 2>&1 ;;
    mariadb) mariadb-admin --no-defaults -S "$S/run/mariadb/mariadb.sock" -u root \
               --connect-timeout=3 ping >/dev/null 2>&1 ;;
    slurmdbd) listening "$SLURMDBD_PORT" &&
               timeout 10 sacctmgr -n -P list cluster format=cluster >/dev/null 2>&1 ;;
    slurmctld) timeout 10 scontrol ping 2>/dev/null | grep -q 'is UP' ;;
    slurmd) [[ $(node_state) =~ ^(idle|mixed|allocated|completing|planned)$ ]] ;;
    postgres) pg_isready -q -h 127.0.0.1 -p "$PG_PORT" -t 3 ;;
    ceph-mon) timeout 15 ceph --connect-timeout 10 mon stat >/dev/null 2>&1 ;;
    ceph-osd) timeout 15 ceph --connect-timeout 10 osd stat -f json 2>/dev/null |
               grep -q '"num_up_osds":1' ;;
    radosgw) curl -sf -o /dev/null --max-time 5 "http://127.0.0.1:$RGW_PORT/" ;;
    mlflow) curl -sf --max-time 5 "http://127.0.0.1:$MLFLOW_PORT/health" 2>/dev/null |
               grep -q OK ;;
  esac
}
node_state() { timeout 10 sinfo -h -N -n "$HOST" -o %T 2>/dev/null | head -n1 || true; }

# ---------------------------------------------------------------- process control
# launch SERVICE CMD...: detached in its own session (pgid = pid), stdin /dev/null, output to
# its log; the pid is written by the process itself right before it execs CMD. Temporary
# files go to the stack's own directory: a caller's TMPDIR (a test's, say) may be deleted
# while the daemon lives on (MLflow's proxied downloads then failed).
launch() {
  local svc=$1; shift
  local pidf=$S/pids/$svc.pid
  rm -f "$pidf"
  mkdir -p "$S/tmp"; chmod 1777 "$S/tmp"   # like /tmp: mariadb and postgres run as their own users
  TMPDIR=$S/tmp setsid bash -c 'echo $$ > "$0"; exec "$@"' "$pidf" "$@" \
    </dev/null >>"$(log "$svc")" 2>&1 9>&- &
  local i
  for i in $(seq 50); do [[ -s $pidf ]] && return 0; sleep 0.1; done
  die "$svc: no pid after launch; log: $(log "$svc")"
}

# Wait until SERVICE is healthy. Returns 1 if it died, 2 on timeout.
await() {
  local svc=$1 deadline=$((SECONDS + ${2:-$WAIT}))
  while ! healthy "$svc"; do
    alive "$svc" || return 1
    ((SECONDS < deadline)) || return 2
    sleep 0.5
  done
}
fail() {  # fail SERVICE RC
  local why="did not become healthy within ${WAIT}s"
  [[ $2 == 1 ]] && why="exited during startup"
  say "error: $1 $why; log: $(log "$1") (last lines below)"
  tail -n 15 "$(log "$1")" >&2 || true
  exit 1
}

stop_svc() {
  local svc=$1 pid sig=TERM target i
  pid=$(pid_of "$svc")
  if ! alive "$svc"; then rm -f "$S/pids/$svc.pid"; say "$svc: not running"; return 0; fi
  target=$pid
  [[ $svc == mlflow ]] && target=-$pid   # mlflow CLI + uvicorn + workers: whole group
  [[ $svc == postgres ]] && sig=INT      # fast shutdown; TERM waits for pooled clients
  kill -"$sig" -- "$target" 2>/dev/null || true
  for i in $(seq 300); do                # 30 s
    pid_running "$pid" || break
    sleep 0.1
  done
  if pid_running "$pid"; then
    say "$svc: pid $pid ignored SIG$sig for 30s, sending KILL"
    # slurmd: its own pid only (job steps must survive a slurmd restart)
    if [[ $svc == slurmd ]]; then kill -KILL "$pid"; else kill -KILL -- "-$pid"; fi 2>/dev/null || true
    sleep 0.5
  fi
  [[ $svc == mlflow || $svc == postgres ]] && { kill -KILL -- "-$pid" 2>/dev/null || true; }
  rm -f "$S/pids/$svc.pid"
  say "$svc: stopped (pid $pid)"
}

# ---------------------------------------------------------------- install
install_packages() {
  local missing=() p
  for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null | grep -qx installed || missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  say "apt: installing ${missing[*]} (log: $(log apt))"
  local t=$EPOCHREALTIME own_policy=
  # No package may start its default service (there may be no init system; the stack runs its
  # own instances on other ports): policy-rc.d exit 101 forbids invoke-rc.d starts.
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d
    own_policy=1
  fi
  local rc=0
  {
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=300 update -q &&
      apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends "${missing[@]}"
  } >>"$(log apt)" 2>&1 || rc=$?
  [[ -n $own_policy ]] && rm -f /usr/sbin/policy-rc.d
  ((rc == 0)) || { tail -n 20 "$(log apt)" >&2; die "apt-get install failed; log: $(log apt)"; }
  stop_default_services
  say "apt: done in $(awk -v a="$t" -v b="$EPOCHREALTIME" 'BEGIN{printf "%.0f", b-a}') s"
}

# If a package started its stock service anyway (init system present, no policy-rc.d), stop it.
stop_default_services() {
  local f pid
  if command -v pg_lsclusters >/dev/null; then
    pg_lsclusters -h 2>/dev/null | awk '$4 == "online" {print $1, $2}' |
      while read -r v c; do say "stopping default PostgreSQL cluster $v/$c"; pg_ctlcluster "$v" "$c" stop || true; done
  fi
  for f in /run/mysqld/mysqld.pid /run/munge/munged.pid /run/slurmctld.pid /run/slurmd.pid \
           /run/slurmdbd.pid /run/ceph/*.pid; do
    [[ -s $f ]] || continue
    pid=$(cat "$f"); kill -0 "$pid" 2>/dev/null || continue
    say "stopping default service from $f (pid $pid)"; kill "$pid" || true
  done
}

install_python() {
  [[ -x $VENV/bin/python ]] || die "no Python environment at $VENV (run 'make env' first)"
  "$VENV/bin/python" -c 'import importlib.util as u, sys
sys.exit(any(u.find_spec(m) is None for m in sys.argv[1:]))' "${PIP_MODS[@]}" && return 0
  say "pip: installing ${PIP_PKGS[*]} into $VENV"
  "$VENV/bin/python" -m pip install -q "${PIP_PKGS[@]}" >>"$(log pip)" 2>&1 ||
    die "pip install failed; log: $(log pip)"
}

# ---------------------------------------------------------------- state, secrets, configs
rand_hex() { openssl rand -hex "$1"; }
init_state() {
  mkdir -p "$S"/{logs,pids,run,slurm/ctld,slurm/d,mlflow}
  chmod 755 "$S" "$S/run"
  if [[ ! -s $S/secrets.env ]]; then
    (umask 077
     { echo "PG_PASS=$(rand_hex 16)"; echo "SLURMDB_PASS=$(rand_hex 16)"
       echo "S3_ACCESS=$(rand_hex 10 | tr a-f A-F)"; echo "S3_SECRET=$(rand_hex 20)"
     } >"$S/secrets.env.tmp" && mv "$S/secrets.env.tmp" "$S/secrets.env")
  fi
  # shellcheck disable=SC1091
  source "$S/secrets.env"
  write_stack_env
}

write_stack_env() {
  local s3=http://127.0.0.1:$RGW_PORT
  (umask 077; cat >"$S/stack.env.tmp" <<EOF
# engineforge team stack (workflow/stack/stack.sh); source me. Contains secrets: mode 600.
export ENGINEFORGE_STACK_DIR=$S
export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT
export ENGINEFORGE_S3_ENDPOINT=$s3
export SNAKEMAKE_STORAGE_S3_ENDPOINT_URL=$s3
export SNAKEMAKE_STORAGE_S3_ACCESS_KEY=$S3_ACCESS
export SNAKEMAKE_STORAGE_S3_SECRET_KEY=$S3_SECRET
export ENGINEFORGE_STACK_PG_URI=postgresql://mlflow:$PG_PASS@127.0.0.1:$PG_PORT/mlflow
export ENGINEFORGE_STACK_S3_ACCESS_KEY=$S3_ACCESS
export ENGINEFORGE_STACK_S3_SECRET_KEY=$S3_SECRET
export ENGINEFORGE_STACK_ARTIFACT_BUCKET=$ART_BUCKET
export ENGINEFORGE_STACK_STORAGE_BUCKET=$STORE_BUCKET
export CEPH_CONF=$S/ceph/ceph.conf
# Slurm: /etc/slurm/slurm.conf (default path), so no SLURM_CONF is needed.
EOF
  mv "$S/stack.env.tmp" "$S/stack.env")
}

# install_file MODE DEST < content; returns 0 if DEST changed
install_file() {
  local tmp; tmp=$(mktemp "$2.XXXXXX")
  cat >"$tmp"; chmod "$1" "$tmp"
  if cmp -s "$tmp" "$2"; then rm -f "$tmp"; return 1; fi
  mv "$tmp" "$2"
}

SLURM_CHANGED=
write_slurm_conf() {
  mkdir -p "$SLURM_ETC"
  local mem cpus proctrack=proctrack/cgroup task=task/cgroup,task/affinity
  cpus=$(nproc)
  mem=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.85}' /proc/meminfo)
  # Fallback when Slurm's cgroup plugins cannot work on this kernel/container (decided once,
  # by finish() when slurmd dies with cgroup errors, or forced: ENGINEFORGE_STACK_SLURM_CGROUP=no).
  if [[ -e $S/slurm/no-cgroup || ${ENGINEFORGE_STACK_SLURM_CGROUP:-yes} == no ]]; then
    proctrack=proctrack/linuxproc task=task/none
  fi
  install_file 644 "$SLURM_ETC/slurm.conf" <<EOF && SLURM_CHANGED=1 || true
$MARK (state: $S)
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$SLURMCTLD_PORT
SlurmdPort=$SLURMD_PORT
# bind slurmctld/slurmd to 127.0.0.1 (SlurmctldHost / NodeAddr), not to every address
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$S/slurm/ctld
SlurmdSpoolDir=$S/slurm/d
SlurmctldPidFile=$S/run/slurmctld.pid
SlurmdPidFile=$S/run/slurmd.pid
SlurmctldLogFile=$(log slurmctld)
SlurmdLogFile=$(log slurmd)
ProctrackType=$proctrack
TaskPlugin=$task
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# without a default, a job that gives no --mem gets the whole node's memory
DefMemPerCPU=1024
JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$SLURMDBD_PORT
MpiDefault=none
ReturnToService=2
SlurmdTimeout=300
MinJobAge=300
KillWait=10
NodeName=$HOST NodeAddr=127.0.0.1 NodeHostname=$HOST CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=cpu Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
# same node, no GRES: lets workflows route "GPU" rules to their own partition
PartitionName=gpu Nodes=$HOST Default=NO MaxTime=INFINITE State=UP
EOF
  install_file 644 "$SLURM_ETC/cgroup.conf" <<EOF && SLURM_CHANGED=1 || true
$MARK
CgroupPlugin=autodetect
# cgroup v2 without systemd (containers): no dbus scope
IgnoreSystemd=yes
ConstrainCores=no
ConstrainRAMSpace=yes
ConstrainSwapSpace=no
ConstrainDevices=no
EOF
  # slurmdbd refuses a slurmdbd.conf readable by others (it holds the DB password)
  install_file 600 "$SLURM_ETC/slurmdbd.conf" <<EOF && SLURM_CHANGED=1 || true
$MARK
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$SLURMDBD_PORT
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$MARIADB_PORT
StorageUser=slurm
StoragePass=$SLURMDB_PASS
StorageLoc=slurm_acct_db
LogFile=$(log slurmdbd)
PidFile=$S/run/slurmdbd.pid
EOF
}

write_ceph_conf() {
  mkdir -p "$S/ceph/run" "$S/ceph/rgw"
  [[ -s $S/ceph/fsid ]] || cat /proc/sys/kernel/random/uuid >"$S/ceph/fsid"
  install_file 644 "$CEPH_CONF" <<EOF || true
$MARK
[global]
fsid = $(cat "$S/ceph/fsid")
mon initial members = a
mon host = [v2:127.0.0.1:$MON2_PORT,v1:127.0.0.1:$MON_PORT]
public addr = 127.0.0.1
cluster addr = 127.0.0.1
public network = 127.0.0.0/8
ms bind ipv6 = false
ms bind port min = ${CEPH_PORTS%-*}
ms bind port max = ${CEPH_PORTS#*-}
# No cephx on this loopback-only cluster. Without the crc/secure modes radosgw loops on
# "get_initial_auth_request returned -13".
auth cluster required = none
auth service required = none
auth client required = none
ms mon client mode = crc secure
ms mon service mode = crc secure
ms mon cluster mode = crc secure
ms client mode = crc secure
ms service mode = crc secure
ms cluster mode = crc secure
run dir = $S/ceph/run
log file = /dev/null
# one OSD: single-replica pools, few PGs, no health fuss about a fuller disk
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon max pg per osd = 1000
mon warn on pool no redundancy = false
mon data avail warn = 2
mon data avail crit = 1
[mon]
mon data = $S/ceph/mon/\$cluster-\$id
log file = $(log ceph-mon)
[osd]
osd data = $S/ceph/osd/\$cluster-\$id
osd objectstore = bluestore
# the OSD's block device is a sparse file created by mkfs
bluestore block create = true
bluestore block size = 10737418240
osd memory target = 1073741824
log file = $(log ceph-osd)
[client.rgw.a]
rgw frontends = beast endpoint=127.0.0.1:$RGW_PORT
rgw data = $S/ceph/rgw
rgw thread pool size = 64
log file = $(log radosgw)
EOF
}

# ---------------------------------------------------------------- services: prepare + launch
begin_munge() {
  [[ -s /etc/munge/munge.key ]] || { mungekey -c -k /etc/munge/munge.key >/dev/null 2>&1 ||
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; }
  chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
  # munged insists on private dirs owned by its user
  install -d -o munge -g munge -m 755 /run/munge
  install -d -o munge -g munge -m 700 "$S/munge"
  launch munge setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged -F \
    --num-threads=10 --socket="$MUNGE_SOCK" --pid-file="$S/munge/munged.pid" \
    --seed-file="$S/munge/munged.seed" --key-file=/etc/munge/munge.key
}

begin_mariadb() {
  install -d -o mysql -g mysql -m 750 "$S/mariadb"
  install -d -o mysql -g mysql -m 755 "$S/run/mariadb"
  if [[ ! -d $S/mariadb/mysql ]]; then
    mariadb-install-db --no-defaults --user=mysql --datadir="$S/mariadb" \
      --auth-root-authentication-method=socket --skip-test-db >>"$(log mariadb)" 2>&1 ||
      die "mariadb-install-db failed; log: $(log mariadb)"
  fi
  launch mariadb /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$S/mariadb" \
    --bind-address=127.0.0.1 --port="$MARIADB_PORT" --skip-name-resolve \
    --socket="$S/run/mariadb/mariadb.sock" --pid-file="$S/run/mariadb/mariadb.pid" \
    --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900 --max-connections=100
}
post_mariadb() {  # slurmdbd's database and user (password via stdin, not argv)
  mariadb --no-defaults -S "$S/run/mariadb/mariadb.sock" -u root <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$SLURMDB_PASS';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$SLURMDB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
EOF
}

begin_slurmdbd() { launch slurmdbd /usr/sbin/slurmdbd -D; }
post_slurmdbd() {  # the cluster must exist in the DB before slurmctld starts
  local sa=(timeout 30 sacctmgr -i)
  if ! sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER"; then
    "${sa[@]}" add cluster "$CLUSTER" >/dev/null
  fi
  if ! sacctmgr -n -P list account format=account 2>/dev/null | grep -qx "$CLUSTER"; then
    "${sa[@]}" add account "$CLUSTER" Cluster="$CLUSTER" Description=engineforge Organization=engineforge >/dev/null
  fi
  if ! sacctmgr -n -P list user root format=defaultaccount 2>/dev/null | grep -qx "$CLUSTER"; then
    "${sa[@]}" add user root Account="$CLUSTER" DefaultAccount="$CLUSTER" >/dev/null || true
  fi
}

begin_slurmctld() { launch slurmctld /usr/sbin/slurmctld -D -i; }
begin_slurmd() { launch slurmd /usr/sbin/slurmd -D; }

begin_postgres() {
  local bin
  bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1)
  install -d -o postgres -g postgres -m 700 "$S/postgres"
  install -d -o postgres -g postgres -m 755 "$S/run/postgres"
  local as_pg=(setpriv --reuid=postgres --regid=postgres --init-groups)
  if [[ ! -s $S/postgres/PG_VERSION ]]; then
    "${as_pg[@]}" "$bin/initdb" -D "$S/postgres" -U postgres -E UTF8 --locale=C.UTF-8 \
      --auth-local=peer --auth-host=scram-sha-256 >>"$(log postgres)" 2>&1 ||
      die "initdb failed; log: $(log postgres)"
  fi
  launch postgres "${as_pg[@]}" "$bin/postgres" -D "$S/postgres" -c listen_addresses=127.0.0.1 \
    -c port="$PG_PORT" -c unix_socket_directories="$S/run/postgres" -c logging_collector=off \
    -c shared_buffers=64MB
}
post_postgres() {  # MLflow's role and database (password via stdin, not argv)
  setpriv --reuid=postgres --regid=postgres --init-groups \
    psql -h "$S/run/postgres" -p "$PG_PORT" -U postgres -d postgres -qAtX -v ON_ERROR_STOP=1 \
    >/dev/null <<EOF
SELECT 'CREATE ROLE mlflow LOGIN' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'mlflow')\gexec
ALTER ROLE mlflow WITH LOGIN PASSWORD '$PG_PASS';
SELECT 'CREATE DATABASE mlflow OWNER mlflow' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'mlflow')\gexec
EOF
}

begin_ceph_mon() {
  local d=$S/ceph/mon/ceph-a
  if [[ ! -e $d/engineforge-ready ]]; then
    rm -rf "$d"; mkdir -p "$d"
    monmaptool --create --clobber --fsid "$(cat "$S/ceph/fsid")" \
      --addv a "[v2:127.0.0.1:$MON2_PORT,v1:127.0.0.1:$MON_PORT]" "$S/ceph/monmap" >/dev/null
    ceph-authtool --create-keyring "$S/ceph/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
    ceph-mon --mkfs -i a --monmap "$S/ceph/monmap" --keyring "$S/ceph/mon.keyring" \
      >>"$(log ceph-mon)" 2>&1 || die "ceph-mon --mkfs failed; log: $(log ceph-mon)"
    touch "$d/engineforge-ready"
  fi
  launch ceph-mon ceph-mon -f -i a
}

begin_ceph_osd() {
  local d=$S/ceph/osd/ceph-0 uuid
  if [[ ! -e $d/engineforge-ready ]]; then
    [[ -s $S/ceph/osd.uuid ]] || cat /proc/sys/kernel/random/uuid >"$S/ceph/osd.uuid"
    uuid=$(cat "$S/ceph/osd.uuid")
    # `osd new` with the same uuid is idempotent, so a half-done init can be retried
    [[ $(timeout 60 ceph osd new "$uuid" 2>>"$(log ceph-osd)") == 0 ]] ||
      die "ceph osd new did not give id 0; log: $(log ceph-osd)"
    rm -rf "$d"; mkdir -p "$d"
    ceph-osd -i 0 --mkfs --osd-uuid "$uuid" >>"$(log ceph-osd)" 2>&1 ||
      die "ceph-osd --mkfs failed; log: $(log ceph-osd)"
    touch "$d/engineforge-ready"
  fi
  launch ceph-osd ceph-osd -f -i 0
}

begin_radosgw() { launch radosgw radosgw -f -n client.rgw.a; }
post_radosgw() {  # S3 user (keys from secrets.env) and the two buckets
  if ! radosgw-admin user info --uid=engineforge >/dev/null 2>&1; then
    radosgw-admin user create --uid=engineforge --display-name=engineforge \
      --access-key="$S3_ACCESS" --secret-key="$S3_SECRET" >/dev/null 2>>"$(log radosgw)" ||
      die "radosgw-admin user create failed; log: $(log radosgw)"
  fi
  AWS_ACCESS_KEY_ID=$S3_ACCESS AWS_SECRET_ACCESS_KEY=$S3_SECRET \
  "$VENV/bin/python" - "http://127.0.0.1:$RGW_PORT" "$ART_BUCKET" "$STORE_BUCKET" \
    2>>"$(log radosgw)" <<'PY' || die "bucket creation failed; log: $(log radosgw)"
import sys, boto3, botocore.exceptions as e
s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1")
for b in sys.argv[2:]:
    try:
        s3.head_bucket(Bucket=b)
    except e.ClientError:
        s3.create_bucket(Bucket=b)
PY
}

begin_mlflow() {
  (
    cd "$S/mlflow"
    # Server-side only: DB password (libpq reads PGPASSWORD) and S3 keys; clients of the
    # proxied artifact store (--artifacts-destination) need neither.
    export PGPASSWORD=$PG_PASS AWS_ACCESS_KEY_ID=$S3_ACCESS AWS_SECRET_ACCESS_KEY=$S3_SECRET
    export MLFLOW_S3_ENDPOINT_URL=http://127.0.0.1:$RGW_PORT AWS_DEFAULT_REGION=us-east-1
    # otherwise MLflow 3.18 starts 8 job-runner processes (~2.5 GB)
    export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
    unset MLFLOW_TRACKING_URI AWS_PROFILE
    launch mlflow "$VENV/bin/mlflow" server \
      --backend-store-uri "postgresql://mlflow@127.0.0.1:$PG_PORT/mlflow" \
      --artifacts-destination "s3://$ART_BUCKET" \
      --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 2
  )
}

# ---------------------------------------------------------------- start / finish one service
declare -A STARTED=()
begin() {  # start SERVICE unless it is running; returns at once
  local svc=$1 p
  alive "$svc" && return 0
  rm -f "$S/pids/$svc.pid"
  for p in $(port_of "$svc" | tr ',-' '  '); do
    [[ $p =~ ^[0-9]+$ && $svc != ceph-osd ]] || continue
    listening "$p" && die "$svc: port $p is already in use by another process (ss -ltnp 'sport = :$p')"
  done
  if [[ $svc == munge ]]; then
    healthy munge && die "munge: another munged already serves $MUNGE_SOCK"
    rm -f "$MUNGE_SOCK"
  fi
  "begin_${svc//-/_}"
  STARTED[$svc]=1
}
finish() {  # wait until SERVICE is healthy; run its setup step if it was just started
  local svc=$1 rc=0
  await "$svc" || rc=$?
  if ((rc)) && [[ $svc == slurmd && ! -e $S/slurm/no-cgroup ]] &&
     grep -qiE 'error.*cgroup|cgroup.*(error|fail)' "$(log slurmd)"; then
    # documented fallback: proctrack/linuxproc + task/none when cgroups fail
    say "slurmd: cgroup plugins failed; switching to proctrack/linuxproc + task/none"
    touch "$S/slurm/no-cgroup"
    stop_svc slurmd >/dev/null 2>&1; write_slurm_conf
    stop_svc slurmctld; begin slurmctld; finish slurmctld
    begin slurmd; rc=0; await slurmd || rc=$?
  fi
  if ((rc)) && [[ $svc == slurmd ]] && alive slurmd &&
     [[ $(node_state) =~ ^(down|drain|drained|draining|fail) ]]; then
    scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true
    rc=0; await slurmd 30 || rc=$?
  fi
  ((rc == 0)) || fail "$svc" "$rc"
  if [[ -n ${STARTED[$svc]:-} ]]; then
    declare -F "post_${svc//-/_}" >/dev/null && "post_${svc//-/_}"
    say "$svc: up (pid $(pid_of "$svc"), port $(port_of "$svc"), t=$(elapsed) s)"
  fi
}
start_one() {
  begin "$1"
  finish "$1"
  [[ -n ${STARTED[$1]:-} ]] || say "$1: already running (pid $(pid_of "$1"))"
}

lock() {
  mkdir -p "$S/logs"
  exec 9>"$S/.lock"
  flock -w 600 9 || die "another stack.sh holds $S/.lock"
}

# ---------------------------------------------------------------- commands
cmd_up() {
  [[ $(id -u) == 0 ]] || die "run as root"
  lock
  install_packages
  install_python
  init_state
  write_slurm_conf
  write_ceph_conf
  if [[ -n $SLURM_CHANGED ]]; then  # running daemons must see the new config
    local d; for d in slurmd slurmctld slurmdbd; do alive "$d" && stop_svc "$d"; done
  fi
  # Launch independent services together, then wait for each in dependency order.
  begin munge; begin mariadb; begin postgres; begin ceph-mon
  finish munge; finish mariadb
  begin slurmdbd; finish postgres
  begin mlflow   # needs PostgreSQL to start; S3 only per request. Its ~20 s start overlaps.
  finish ceph-mon; begin ceph-osd
  finish slurmdbd; begin slurmctld; finish slurmctld
  begin slurmd; finish ceph-osd
  begin radosgw; finish slurmd; finish radosgw
  finish mlflow
  say "all services healthy in $(elapsed) s; clients: source $S/stack.env"
}

cmd_down() {
  [[ -d $S ]] || { say "nothing at $S"; return 0; }
  lock
  local i
  for ((i = ${#SERVICES[@]} - 1; i >= 0; i--)); do stop_svc "${SERVICES[i]}"; done
  if [[ ${1:-} == --purge ]]; then
    rm -rf "$S"
    local f; for f in slurm.conf cgroup.conf slurmdbd.conf; do
      grep -qF "$MARK" "$SLURM_ETC/$f" 2>/dev/null && rm -f "$SLURM_ETC/$f"
    done
    say "purged $S"
  fi
}

cmd_start() {
  port_of "$1" >/dev/null
  lock
  init_state
  write_slurm_conf
  write_ceph_conf
  start_one "$1"
}

cmd_stop() { port_of "$1" >/dev/null; [[ -d $S ]] || return 0; lock; stop_svc "$1"; }

cmd_status() {
  local svc
  for svc in "${SERVICES[@]}"; do
    if alive "$svc"; then
      printf '%-10s running  pid %-8s port %s\n' "$svc" "$(pid_of "$svc")" "$(port_of "$svc")"
    else
      printf '%-10s dead     pid %-8s port %s\n' "$svc" "-" "$(port_of "$svc")"
    fi
  done
}

case ${1:-} in
  up) cmd_up ;;
  down) cmd_down "${2:-}" ;;
  start) [[ -n ${2:-} ]] || die "usage: $0 start SERVICE"; cmd_start "$2" ;;
  stop) [[ -n ${2:-} ]] || die "usage: $0 stop SERVICE"; cmd_stop "$2" ;;
  status) cmd_status ;;
  env) [[ -s $S/stack.env ]] || die "no $S/stack.env (run: $0 up)"; echo "$S/stack.env" ;;
  *) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
