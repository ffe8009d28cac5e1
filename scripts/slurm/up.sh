#!/usr/bin/env bash
# Start a single-node SLURM cluster (slurmctld, slurmd, slurmdbd with MariaDB, munge) from Debian's packages,
# everything -- confs, state, logs, pid files, the database -- under one directory, wiped first.
#   scripts/slurm/up.sh [DIR]        (DIR defaults to $SLURM_DIR or /tmp/normbench-slurm)
#   export SLURM_CONF=DIR/slurm.conf # then sinfo, sbatch, and `normbench sweep ... hydra/launcher=slurm_local`
# scripts/slurm/down.sh stops exactly the daemons recorded in DIR/pids.
set -euo pipefail
DIR=$(realpath -m "${1:-${SLURM_DIR:-/tmp/normbench-slurm}}")
HERE=$(cd "$(dirname "$0")" && pwd)
PACKAGES="slurm-wlm munge slurmdbd mariadb-server"

# One line on failure, and whatever this run had started is stopped again (down.sh reads DIR/pids).
fail() {
  echo "slurm-up: error: $*" >&2
  [ -f "$DIR/pids" ] && "$HERE/down.sh" "$DIR" >/dev/null 2>&1
  exit 1
}

if [ "$(id -u)" != 0 ] || [ ! -f /etc/debian_version ] || ! command -v apt-get >/dev/null; then
  fail "needs root on Debian (apt-get) to install and run $PACKAGES; elsewhere point SLURM_CONF at a real cluster"
fi
missing=""
for cmd in slurmctld slurmd slurmdbd sacctmgr munged mariadbd mariadb-install-db; do
  command -v "$cmd" >/dev/null || missing="$missing $cmd"
done
if [ -n "$missing" ]; then  # apt only when something is missing: a second `up` takes seconds
  echo "slurm-up: installing $PACKAGES (missing:$missing)"
  export DEBIAN_FRONTEND=noninteractive
  apt_install() { apt-get install -y -q --no-install-recommends $PACKAGES >"$DIR.apt.log" 2>&1; }
  mkdir -p "$(dirname "$DIR")"
  apt_install || { apt-get update -q >>"$DIR.apt.log" 2>&1 && apt_install; } \
    || fail "apt-get install $PACKAGES failed (log: $DIR.apt.log)"
fi

# A cluster left up by an earlier `up` is stopped first: its pids are recorded, nothing else is touched.
[ -f "$DIR/pids" ] && "$HERE/down.sh" "$DIR"
rm -rf "$DIR"
mkdir -p "$DIR"/{log,run,munge,ctld,spool,mysql}
chmod 755 "$DIR/munge"  # the socket must be reachable; the key itself is 0400
: >"$DIR/pids"

# Wait (bounded) for a daemon's pid file, then record the pid for down.sh.
record() {  # NAME PIDFILE
  for _ in $(seq 100); do
    if [ -s "$2" ] && kill -0 "$(cat "$2")" 2>/dev/null; then echo "$1 $(cat "$2")" >>"$DIR/pids"; return; fi
    sleep 0.1
  done
  fail "$1 did not start; see $DIR/log/$1.log"
}

# ---- munge: its own key and socket, so a system munged (if any) is left alone ----
dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$DIR/munge/munge.key"
munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
  --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed" \
  >>"$DIR/log/munged.log" 2>&1 || fail "munged did not start; see $DIR/log/munged.log"
record munged "$DIR/run/munged.pid"

# ---- MariaDB for slurmdbd: no network, socket and pid file in DIR ----
mariadb-install-db --no-defaults --user=root --datadir="$DIR/mysql" --auth-root-authentication-method=normal \
  >"$DIR/log/mariadb-install.log" 2>&1 || fail "mariadb-install-db failed; see $DIR/log/mariadb-install.log"
setsid mariadbd --no-defaults --user=root --datadir="$DIR/mysql" --socket="$DIR/run/mysql.sock" \
  --pid-file="$DIR/run/mariadbd.pid" --skip-networking --log-error="$DIR/log/mariadbd.log" \
  --innodb-buffer-pool-size=32M </dev/null >/dev/null 2>&1 &
record mariadbd "$DIR/run/mariadbd.pid"
for _ in $(seq 100); do
  mariadb --no-defaults --socket="$DIR/run/mysql.sock" -u root -e "SELECT 1" >/dev/null 2>&1 && break
  sleep 0.2
done
mariadb --no-defaults --socket="$DIR/run/mysql.sock" -u root -e "CREATE DATABASE slurm_acct_db" \
  || fail "could not create the accounting database; see $DIR/log/mariadbd.log"

# ---- SLURM configuration: one node with this machine's CPUs and memory (slurmd -C) ----
node=$(slurmd -C | head -1)
cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$node")
memory=$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$node")
auth="AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=10"  # a requeued job restarts after cred_expire
cat >"$DIR/slurm.conf" <<CONF
ClusterName=normbench
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
$auth
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
MailProg=/bin/true
JobRequeue=1
ReturnToService=2
KillWait=10
SchedulerParameters=sched_interval=5
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
# The munge socket for connections to slurmdbd (sacct, sacctmgr): AuthInfo's socket does not cover them.
AccountingStoragePass=$DIR/munge/munge.socket
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=local Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
cat >"$DIR/slurmdbd.conf" <<CONF
DbdHost=localhost
SlurmUser=root
AuthType=auth/munge
$auth
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageUser=root
StorageLoc=slurm_acct_db
CONF
chmod 600 "$DIR/slurmdbd.conf"
export SLURM_CONF="$DIR/slurm.conf"

# slurmdbd reads slurmdbd.conf beside $SLURM_CONF, and reaches MariaDB through the client library's default
# socket, which MYSQL_UNIX_PORT overrides.
MYSQL_UNIX_PORT="$DIR/run/mysql.sock" slurmdbd || fail "slurmdbd did not start; see $DIR/log/slurmdbd.log"
record slurmdbd "$DIR/run/slurmdbd.pid"
for _ in $(seq 20); do sacctmgr -i add cluster normbench >/dev/null 2>&1 && break; sleep 0.2; done
sacctmgr -n list cluster format=cluster | grep -q normbench || fail "slurmdbd does not answer; see $DIR/log/slurmdbd.log"
slurmctld || fail "slurmctld did not start; see $DIR/log/slurmctld.log"
record slurmctld "$DIR/run/slurmctld.pid"
slurmd -N localhost || fail "slurmd did not start; see $DIR/log/slurmd.log"
record slurmd "$DIR/run/slurmd.pid"
for _ in $(seq 150); do
  [ "$(sinfo -h -n localhost -o %t 2>/dev/null)" = idle ] && break
  sleep 0.2
done
[ "$(sinfo -h -n localhost -o %t)" = idle ] || fail "the node is not idle ($(sinfo -h -o %t)); see $DIR/log/"
echo "slurm-up: cluster 'normbench' up ($cpus CPUs, $memory MB) in $DIR; export SLURM_CONF=$DIR/slurm.conf"
