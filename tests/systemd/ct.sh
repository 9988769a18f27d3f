# Boot a real systemd (PID 1) inside systemd-nspawn, even on a machine whose own PID 1 is not
# systemd, and run commands inside it. Source this file from bash (root needed):
#
#   . tests/systemd/ct.sh
#   ct_boot NAME [extra systemd-nspawn args...]   # e.g. --bind-ro=$PWD/target/debug/x:/opt/ci/x
#   ct systemctl status foo                       # run anything inside the container
#   ct_stop                                       # the caller traps EXIT to call it
#
# The container is an empty tmpfs root with the host's /usr mounted read-only
# (--volatile=yes): nothing to download, nothing written to disk, boot in about 1-2 s.
# Needs systemd-nspawn (Debian: apt-get install --no-install-recommends systemd-container).
#
# Facts this relies on (each costs a hang or an error if dropped):
# - --keep-unit: without a host systemd, nspawn cannot create its scope over D-Bus.
# - systemd.firstboot=off + a 'disable *' preset: an empty /etc looks like a first boot, and
#   systemd-firstboot would prompt forever; Debian's default preset would enable every unit.
# - wait for /run/systemd/private before 'is-system-running --wait' (else: "offline").
# - nspawn runs from its own cgroup folder so two containers never share 'payload'.
# - host /usr is read-only inside: bind binaries under /opt or /run, not /usr/local.
# - /etc is empty (tmpfs) inside: bind /etc/ssl read-only if something needs CA certificates;
#   User=/DynamicUser= need care (no passwd entries beyond what sysusers creates).
# - --private-network: 127.0.0.1 inside is the container's own loopback.
# - cgroup resource limits (MemoryMax=, CPUQuota=) are not enforced in this container.
# - every wait is bounded: an unbounded wait here hangs the whole run.

CT_NAME= CT_NSPAWN_PID= CT_LEADER= CT_LOG=

# Runs a command inside the container (all namespaces of its PID 1), bounded by $CT_TIMEOUT.
ct() { timeout "${CT_TIMEOUT:-30}" nsenter -t "$CT_LEADER" -a "$@"; }

# The cgroup v1 hierarchies nspawn needs a folder in (hybrid or legacy hosts); on a pure
# cgroup v2 host only the unified one exists and is /sys/fs/cgroup itself.
_ct_cgroups() {
  if [ -d /sys/fs/cgroup/systemd ]; then
    echo "/sys/fs/cgroup/systemd/$CT_NAME"
    [ -d /sys/fs/cgroup/unified ] && echo "/sys/fs/cgroup/unified/$CT_NAME"
  else
    echo "/sys/fs/cgroup/$CT_NAME"
  fi
  return 0
}

# Prints the pid of a child of $1 whose command name is $2 (pgrep -P $1 -x $2, without procps).
_ct_child_named() {
  local f st rest
  for f in /proc/[0-9]*/stat; do
    read -r st < "$f" 2>/dev/null || continue
    rest=${st##*) }                      # "state ppid ..." after "pid (comm) "
    set -- "$1" "$2" $rest
    [ "$4" = "$1" ] || continue
    [ "$(cat "${f%/stat}/comm" 2>/dev/null)" = "$2" ] && { echo "${st%% *}"; return 0; }
  done
  return 0
}

ct_boot() {
  CT_NAME=$1; shift
  command -v systemd-nspawn >/dev/null || {
    echo "ct_boot: systemd-nspawn missing (apt-get install systemd-container)" >&2; return 1; }
  CT_LOG=${CT_LOG:-/tmp/$CT_NAME.nspawn.log}
  local cg
  for cg in $(_ct_cgroups); do mkdir -p "$cg"; done
  printf 'disable *\n' > "/tmp/$CT_NAME.preset"
  ( for cg in $(_ct_cgroups); do echo "$BASHPID" > "$cg/cgroup.procs"; done
    exec systemd-nspawn --boot --register=no --keep-unit --private-network --console=passive \
      -M "$CT_NAME" -D / --volatile=yes \
      --bind-ro="/tmp/$CT_NAME.preset:/etc/systemd/system-preset/00-ct.preset" \
      "$@" systemd.firstboot=off ) > "$CT_LOG" 2>&1 &
  CT_NSPAWN_PID=$!
  local i
  for i in $(seq 100); do
    CT_LEADER=$(_ct_child_named "$CT_NSPAWN_PID" systemd)
    [ -n "$CT_LEADER" ] && break
    kill -0 "$CT_NSPAWN_PID" 2>/dev/null || { cat "$CT_LOG" >&2; return 1; }
    sleep 0.1
  done
  [ -n "$CT_LEADER" ] || { echo "ct_boot: no PID 1 in the container after 10 s" >&2; return 1; }
  for i in $(seq 300); do ct test -S /run/systemd/private 2>/dev/null && break; sleep 0.1; done
  local state
  state=$(CT_TIMEOUT=90 ct systemctl is-system-running --wait || true)
  case $state in
    running|degraded) ;;
    *) echo "ct_boot: container state '$state'" >&2; ct systemctl list-jobs --no-pager >&2
       return 1 ;;
  esac
}

ct_stop() {
  [ -n "$CT_NSPAWN_PID" ] || return 0
  if kill -0 "$CT_NSPAWN_PID" 2>/dev/null; then
    kill -TERM "$CT_NSPAWN_PID"          # nspawn turns this into a clean poweroff
    local i
    for i in $(seq 150); do kill -0 "$CT_NSPAWN_PID" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$CT_NSPAWN_PID" 2>/dev/null && kill -KILL "$CT_NSPAWN_PID"
    wait "$CT_NSPAWN_PID" 2>/dev/null
  fi
  local cg
  for cg in $(_ct_cgroups); do
    [ "$cg" = /sys/fs/cgroup/ ] || find "$cg" -depth -type d -exec rmdir {} \; 2>/dev/null
  done
  rm -rf "/run/systemd/nspawn/propagate/$CT_NAME" "/tmp/$CT_NAME.preset"
  CT_NSPAWN_PID=
  return 0
}
