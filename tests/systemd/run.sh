#!/usr/bin/env bash
# The shipped units (units/nixfleet-agent.service, and units/user/nixfleet-agent.service under
# root's user manager in check 13), installed unchanged but for the binary path, running the real
# agent binary under a real systemd (PID 1 in systemd-nspawn, see ct.sh), with the fake
# dashboard in the same container. One line per check, then "N passed, M failed".
#
# Usage (root):  cargo build --workspace && tests/systemd/run.sh
# Env:  NIXFLEET_BIN_DIR   where nixfleet-agent and fake-dashboard are (default target/debug,
#                          or $CARGO_TARGET_DIR/debug)
#       KEEP_LOGS=1        keep the work folder (journal dumps) even when everything passed
# The container's /etc is empty (no CA store): the agent must work over http:// without one.
# Needs: systemd-nspawn (Debian: systemd-container), curl, python3. Installs nothing. About 60 s.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
bin_dir=${NIXFLEET_BIN_DIR:-${CARGO_TARGET_DIR:-$repo/target}/debug}
unit_src=$repo/units/nixfleet-agent.service
unit=nixfleet-agent.service
T0=$(date +%s.%N)

command -v systemd-nspawn >/dev/null || {
  echo "FAIL setup: systemd-nspawn is missing (Debian: apt-get install --no-install-recommends systemd-container)" >&2
  exit 2; }
for tool in nsenter curl timeout python3; do
  command -v "$tool" >/dev/null || { echo "FAIL setup: $tool is missing" >&2; exit 2; }
done
[ "$(id -u)" = 0 ] || { echo "FAIL setup: must run as root (systemd-nspawn)" >&2; exit 2; }
for b in nixfleet-agent fake-dashboard; do
  [ -x "$bin_dir/$b" ] || {
    echo "FAIL setup: $bin_dir/$b not found: run 'cargo build --workspace' first" >&2; exit 2; }
done
[ -f "$unit_src" ] || { echo "FAIL setup: $unit_src not found" >&2; exit 2; }

. "$here/ct.sh"

work=$(mktemp -d /tmp/nixfleet-systemd.XXXXXX)
CT_LOG=$work/nspawn.log
passed=0 failed=0

elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}'; }
pass() { passed=$((passed + 1)); echo "PASS $1${2:+ ($2)}"; }
fail() { failed=$((failed + 1)); echo "FAIL $1: $2"; }

# wait_until SECONDS CMD...: polls CMD every 0.2 s until it succeeds; false after SECONDS.
wait_until() {
  local deadline
  deadline=$(awk -v t="$1" -v n="$(date +%s.%N)" 'BEGIN{printf "%.3f", n+t}'); shift
  while :; do
    "$@" >/dev/null 2>&1 && return 0
    awk -v d="$deadline" -v n="$(date +%s.%N)" 'BEGIN{exit !(n>=d)}' && return 1
    sleep 0.2
  done
}

prop() { ct systemctl show -P "$1" "$unit" 2>/dev/null; }
journal() { ct journalctl -b -u "$unit" --no-pager -o cat "$@" 2>/dev/null; }
control() { # control METHOD PATH [JSON]: the fake dashboard's control API (inside the container)
  ct curl -sS --max-time 5 -X "$1" ${3:+-H 'Content-Type: application/json' --data "$3"} \
    "http://127.0.0.1:8001$2"
}
is_active_with_new_pid() { # OLD_PID
  local pid
  [ "$(prop ActiveState)" = active ] && [ "$(prop SubState)" = running ] &&
    pid=$(prop MainPID) && [ "$pid" != 0 ] && [ "$pid" != "$1" ]
}
nrestarts_above() { [ "$(prop NRestarts)" -gt "$1" ]; }
# grep reads to the end (no -q): an early exit would SIGPIPE journalctl and, with pipefail,
# fail the pipeline although the line was found.
journal_has() { journal | grep -F -- "$1" >/dev/null; }
usec_to_s() { # systemd's "45s", "1min 30s", "3s", "500ms" -> seconds
  awk '{t=0; for(i=1;i<=NF;i++){v=$i; if(v~/ms$/){sub(/ms$/,"",v);t+=v/1000}
        else if(v~/min$/){sub(/min$/,"",v);t+=v*60} else if(v~/h$/){sub(/h$/,"",v);t+=v*3600}
        else if(v~/us$/){sub(/us$/,"",v);t+=v/1e6} else {sub(/s$/,"",v);t+=v}}; print t}' <<<"$1"
}

cleanup() {
  local rc=$?
  if [ -n "$CT_NSPAWN_PID" ] && [ -n "$CT_LEADER" ] &&
     { [ "$failed" -gt 0 ] || [ "$rc" != 0 ] || [ -n "${KEEP_LOGS:-}" ]; }; then
    CT_TIMEOUT=10 ct journalctl -b --no-pager -o short-monotonic > "$work/journal.txt" 2>&1
    CT_TIMEOUT=10 ct journalctl -b --no-pager -o json -u "$unit" > "$work/agent-journal.json" 2>&1
    CT_TIMEOUT=10 ct journalctl -b --no-pager -u fake-dashboard -o cat > "$work/fake-dashboard.txt" 2>&1
    if [ "$failed" -gt 0 ] || [ "$rc" != 0 ]; then
      echo "--- last journal lines (full dumps in $work) ---"
      tail -n 40 "$work/journal.txt"
    else
      echo "journal dumps kept in $work"
    fi
  fi
  ct_stop
  if [ "$failed" -eq 0 ] && [ "$rc" = 0 ] && [ -z "${KEEP_LOGS:-}" ]; then rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

setup_fail() { echo "FAIL setup: $*"; failed=$((failed + 1)); echo "$passed passed, $failed failed"; exit 1; }

# ---- boot ------------------------------------------------------------------------------------
binds=(--bind-ro="$bin_dir/nixfleet-agent:/opt/ci/nixfleet-agent"
       --bind-ro="$bin_dir/fake-dashboard:/opt/ci/fake-dashboard")
ct_boot "nfci-$$" "${binds[@]}" \
  || setup_fail "container did not boot (see $CT_LOG)"
echo "booted systemd in the container in $(elapsed "$T0") s"

# ---- fake dashboard --------------------------------------------------------------------------
ct systemd-run --quiet --unit fake-dashboard -p Type=exec \
  /opt/ci/fake-dashboard --port 8000 --control-port 8001 \
  || setup_fail "systemd-run fake-dashboard failed"
port_open() { ct bash -c "exec 3<>/dev/tcp/127.0.0.1/$1"; }
wait_until 15 port_open 8000 && wait_until 5 port_open 8001 \
  || setup_fail "fake dashboard not listening on 8000/8001 after 15 s: $(ct journalctl -u fake-dashboard --no-pager -o cat | tail -5)"

# ---- the agent's configuration repository and settings ---------------------------------------
ct sh -ec '
  export HOME=/root GIT_CONFIG_NOSYSTEM=1
  mkdir -p /root /var/lib/ci
  git init -q --bare /var/lib/ci/origin.git
  git clone -q /var/lib/ci/origin.git /var/lib/ci/nixcfg 2>/dev/null
  cd /var/lib/ci/nixcfg
  echo "{ }" > flake.nix
  git add flake.nix
  git -c user.name=ci -c user.email=ci@localhost commit -qm init
  git push -q -u origin HEAD
' > "$work/git-setup.log" 2>&1 || setup_fail "git repo setup failed: $(cat "$work/git-setup.log")"

# The shipped unit, unchanged but for the binary path (ExecStart= and ExecStopPost=). The credential source
# (/etc/nixfleet-agent/token) and the EnvironmentFile are written at their shipped paths: /etc is
# the container's own tmpfs.
sed -E 's#^(ExecStart|ExecStopPost)=([-@:+!]*)/[^ ]*/nixfleet-agent( |$)#\1=\2/opt/ci/nixfleet-agent\3#' \
  "$unit_src" > "$work/$unit"
grep -q '^ExecStart=[-@:+!]*/opt/ci/nixfleet-agent' "$work/$unit" \
  || setup_fail "could not rewrite ExecStart= in $unit_src (expected ExecStart=/some/path/nixfleet-agent ...)"
grep -q '^ExecStopPost=-/opt/ci/nixfleet-agent record-exit$' "$work/$unit" \
  || setup_fail "could not rewrite ExecStopPost= in $unit_src (expected ExecStopPost=-/some/path/nixfleet-agent record-exit)"
[ "$(diff "$unit_src" "$work/$unit" | grep -c '^[<>]')" = 4 ] \
  || setup_fail "the path substitution changed more than the ExecStart= and ExecStopPost= lines: $(diff "$unit_src" "$work/$unit")"
ct mkdir -p /etc/systemd/system/$unit.d /etc/nixfleet-agent
ct sh -c "cat > /etc/systemd/system/$unit" < "$work/$unit"
ct sh -c 'umask 077; cat > /etc/nixfleet-agent/token' <<<"shared-secret-token"
ct sh -c 'cat > /etc/nixfleet-agent/env' <<'EOF'
NIXFLEET_URL=http://127.0.0.1:8000
NIXFLEET_ALLOW_INSECURE_HTTP=1
NIXFLEET_HOSTNAME=cthost
NIXFLEET_NIXCFG=/var/lib/ci/nixcfg
EOF
# Interval here (not in the env file, which would win over Environment=) so that check 10 can
# override it with a later drop-in. A short watchdog so the SIGSTOP check is quick.
ct sh -c "cat > /etc/systemd/system/$unit.d/10-ci.conf" <<'EOF'
[Service]
Environment=NIXFLEET_INTERVAL=2
WatchdogSec=4
EOF
ct systemctl daemon-reload || setup_fail "daemon-reload failed"

# ---- 1. systemd-analyze verify ---------------------------------------------------------------
out=$(ct systemd-analyze verify --man=no "/etc/systemd/system/$unit" 2>&1); rc=$?
if [ $rc -ne 0 ] || [ -n "$out" ]; then
  fail verify "systemd-analyze verify (exit $rc) printed: $out"
else
  pass verify "no output"
fi

# ---- 2. start returns only after READY=1 -----------------------------------------------------
t0=$(date +%s.%N)
out=$(ct systemctl start "$unit" 2>&1); rc=$?
start_s=$(elapsed "$t0")
state=$(prop ActiveState)/$(prop SubState)
lock_pid=$(ct cat /run/nixfleet-agent/agent.lock 2>/dev/null | sed -n 's/^pid=//p')
if [ $rc -eq 124 ]; then
  fail start-ready "systemctl start did not return within ${CT_TIMEOUT:-30}s (no READY=1?); state $state, StatusText '$(prop StatusText)'"
elif [ $rc -ne 0 ]; then
  fail start-ready "systemctl start failed (exit $rc) after ${start_s}s: $out"
elif [ "$state" != active/running ]; then
  fail start-ready "state right after 'systemctl start' returned is $state, not active/running (returned before READY=1?)"
else
  # The agent's own "starting" line must precede systemd's "Started ..." (logged on READY=1).
  # Both go through the journal socket, so their order there is the order they were sent;
  # journald may still be catching up, hence the wait.
  started_logged() { journal | grep '^Started ' >/dev/null; }
  wait_until 5 started_logged
  lines=$(journal)
  n_starting=$(grep -n 'nixfleet-agent starting' <<<"$lines" | head -1 | cut -d: -f1)
  n_started=$(grep -n '^Started ' <<<"$lines" | head -1 | cut -d: -f1)
  exec_us=$(prop ExecMainStartTimestampMonotonic) active_us=$(prop ActiveEnterTimestampMonotonic)
  ready_ms=$(( (active_us - exec_us) / 1000 ))
  if [ -z "$n_starting" ]; then
    fail start-ready "no 'nixfleet-agent starting' line in the journal before start returned"
  elif [ -z "$n_started" ] || [ "$n_starting" -gt "$n_started" ]; then
    fail start-ready "'nixfleet-agent starting' (line ${n_starting}) not logged before systemd's 'Started' line (${n_started:-none})"
  elif [ "$lock_pid" != "$(prop MainPID)" ]; then
    fail start-ready "READY=1 came but /run/nixfleet-agent/agent.lock names pid '$lock_pid', not MainPID $(prop MainPID)"
  else
    pass start-ready "systemctl start took ${start_s}s, exec to READY ${ready_ms}ms, then active/running, lock held by MainPID $lock_pid"
  fi
fi

# ---- 3. STATUS= ------------------------------------------------------------------------------
status_ok() { prop StatusText | grep -Eq 'idle|last heartbeat'; }
if wait_until 10 status_ok; then
  st=$(prop StatusText)
  if ct systemctl status "$unit" --no-pager 2>&1 | grep -qF "Status: \"$st" ||
     ct systemctl status "$unit" --no-pager 2>&1 | grep -Eq 'Status: ".*(idle|last heartbeat)'; then
    pass status-text "StatusText: $st"
  else
    fail status-text "StatusText is '$st' but 'systemctl status' does not show it"
  fi
else
  fail status-text "StatusText is '$(prop StatusText)' after 10 s (expected 'idle' or 'last heartbeat')"
fi

# ---- 4. the fake dashboard saw register + "Agent started" -------------------------------------
saw_register() { control GET /_fake/requests | grep -q '"endpoint":"register","host_id":"cthost"'; }
saw_started() {
  local r
  r=$(control GET /_fake/requests) &&
    grep -q '"endpoint":"status","host_id":"cthost"' <<<"$r" &&
    grep -q '"output":"Agent started' <<<"$r"
}
if ! wait_until 10 saw_register; then
  fail dashboard-register "no register for cthost in GET /_fake/requests after 10 s"
elif ! wait_until 10 saw_started; then
  fail dashboard-register "register seen, but no status 'Agent started ...' for cthost after 10 s"
else
  pass dashboard-register "register and status 'Agent started' for cthost"
fi

# ---- 5. a pull command, and its structured journal fields -------------------------------------
out=$(control POST /_fake/command/cthost '{"command":"pull","force":true}' 2>&1)
pull_entry() { ct journalctl -b -u "$unit" --no-pager -o json NIXFLEET_COMMAND=pull | grep -q NIXFLEET_COMMAND; }
pull_reported() { control GET /_fake/logs/cthost | grep -q '"command":"pull","status":"ok"'; }
pull_done() { ct journalctl -b -u "$unit" --no-pager -o json NIXFLEET_COMMAND=pull | grep -q NIXFLEET_DURATION_MS; }
if ! grep -q '"forced"' <<<"$out"; then
  fail journal-fields "queueing pull through the control API failed: $out"
elif ! wait_until 15 pull_entry; then
  fail journal-fields "no journal entry with NIXFLEET_COMMAND=pull after 15 s (journalctl -u $unit NIXFLEET_COMMAND=pull)"
else
  j=$(ct journalctl -b -u "$unit" --no-pager -o json NIXFLEET_COMMAND=pull | head -1)
  if ! grep -q '"SYSLOG_IDENTIFIER":"nixfleet-agent"' <<<"$j"; then
    fail journal-fields "entry lacks SYSLOG_IDENTIFIER=nixfleet-agent: $j"
  elif ! grep -q '"PRIORITY":"[0-7]"' <<<"$j"; then
    fail journal-fields "entry lacks a PRIORITY field: $j"
  elif ! grep -q '"_TRANSPORT":"journal"' <<<"$j"; then
    fail journal-fields "entry did not come through the native journal protocol: $j"
  elif ! ct journalctl -b -u "$unit" --no-pager -o json PRIORITY=4 SYSLOG_IDENTIFIER=nixfleet-agent |
         grep -q 'NIXFLEET_ALLOW_INSECURE_HTTP is set'; then
    fail journal-fields "the NIXFLEET_ALLOW_INSECURE_HTTP warning is not in the journal at PRIORITY=4 (warning)"
  elif ! wait_until 15 pull_done; then
    fail journal-fields "pull never logged its end (no entry with NIXFLEET_COMMAND=pull and NIXFLEET_DURATION_MS after 15 s)"
  elif ! wait_until 10 pull_reported; then
    fail journal-fields "the dashboard's log for cthost has no finished pull after 10 s: $(control GET /_fake/logs/cthost)"
  else
    done_msg=$(ct journalctl -b -u "$unit" --no-pager -o cat NIXFLEET_COMMAND=pull | tail -1)
    pass journal-fields "native entries with NIXFLEET_COMMAND=pull, SYSLOG_IDENTIFIER=nixfleet-agent, PRIORITY (warning=4), NIXFLEET_DURATION_MS; last: $done_msg"
  fi
fi

# ---- 6. SIGSTOP -> watchdog restart ----------------------------------------------------------
wd_s=$(usec_to_s "$(prop WatchdogUSec)") restart_s=$(usec_to_s "$(prop RestartUSec)")
pid=$(prop MainPID) n0=$(prop NRestarts)
t0=$(date +%s.%N)
# Never "kill 0" (an empty MainPID would stop our own process group).
[ "${pid:-0}" -gt 1 ] && ct kill -STOP "$pid"
watchdog_logged() { journal | grep -E "Failed with result 'watchdog'|[Ww]atchdog timeout" >/dev/null; }
if ! wait_until "$(awk -v a="$wd_s" 'BEGIN{print a+5}')" watchdog_logged; then
  fail watchdog "no \"Failed with result 'watchdog'\" within WatchdogSec+5 s ($(elapsed "$t0") s) after SIGSTOP of pid $pid"
  [ "${pid:-0}" -gt 1 ] && ct kill -CONT "$pid" 2>/dev/null
else
  wd_after=$(elapsed "$t0")
  if ! wait_until "$(awk -v a="$restart_s" 'BEGIN{print a+10}')" nrestarts_above "$n0"; then
    fail watchdog "watchdog fired after ${wd_after}s but NRestarts is still $(prop NRestarts) after RestartSec+10 s"
  elif ! wait_until 10 is_active_with_new_pid "$pid"; then
    fail watchdog "restarted (NRestarts $(prop NRestarts)) but not active/running with a new pid: $(prop ActiveState)/$(prop SubState) pid $(prop MainPID)"
  else
    pass watchdog "watchdog fired ${wd_after}s after SIGSTOP (WatchdogSec=${wd_s}s), active again with pid $(prop MainPID) after $(elapsed "$t0")s, NRestarts $n0 -> $(prop NRestarts)"
  fi
fi

# ---- 7. a duplicate started by hand is refused -------------------------------------------------
pid=$(prop MainPID)
out=$(ct env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/root \
  NIXFLEET_URL=http://127.0.0.1:8000 NIXFLEET_ALLOW_INSECURE_HTTP=1 NIXFLEET_HOSTNAME=cthost \
  NIXFLEET_INTERVAL=2 NIXFLEET_NIXCFG=/var/lib/ci/nixcfg NIXFLEET_TOKEN_FILE=/etc/nixfleet-agent/token \
  NIXFLEET_RUNTIME_DIR=/run/nixfleet-agent NIXFLEET_STATE_DIR=/var/lib/nixfleet-agent \
  timeout 15 /opt/ci/nixfleet-agent run 2>&1); rc=$?
if [ $rc -ne 75 ]; then
  fail duplicate "second agent exited $rc, expected 75: $(tail -3 <<<"$out")"
elif ! grep -q "already running.*pid $pid\b" <<<"$out"; then
  fail duplicate "exit 75, but the message does not name the running agent (pid $pid): $out"
elif [ "$(prop MainPID)" != "$pid" ] || [ "$(prop ActiveState)" != active ]; then
  fail duplicate "the running agent was disturbed: now $(prop ActiveState) pid $(prop MainPID)"
else
  pass duplicate "exit 75: $(grep -o 'another nixfleet-agent is already running: pid [0-9]*' <<<"$out")"
fi

# ---- 8. kill -9 -> restarted, lock taken by the new instance ----------------------------------
pid=$(prop MainPID) n0=$(prop NRestarts)
t0=$(date +%s.%N)
[ "${pid:-0}" -gt 1 ] && ct kill -KILL "$pid"
lock_holder() { ct cat /run/nixfleet-agent/agent.lock 2>/dev/null | sed -n 's/^pid=//p'; }
lock_is_new_main() { local p; p=$(prop MainPID); [ "$p" != 0 ] && [ "$(lock_holder)" = "$p" ]; }
if ! wait_until "$(awk -v a="$restart_s" 'BEGIN{print a+10}')" nrestarts_above "$n0"; then
  fail kill9 "NRestarts still $(prop NRestarts) RestartSec+10 s after kill -9 of pid $pid"
elif ! wait_until 10 is_active_with_new_pid "$pid"; then
  fail kill9 "not active/running with a new pid: $(prop ActiveState)/$(prop SubState) pid $(prop MainPID)"
elif ! wait_until 5 lock_is_new_main; then
  fail kill9 "agent.lock names pid '$(lock_holder)', the new MainPID is $(prop MainPID)"
else
  pass kill9 "active again with pid $(prop MainPID) after $(elapsed "$t0")s, NRestarts $n0 -> $(prop NRestarts), agent.lock pid=$(lock_holder)"
fi

# ---- 8b. the start report names the cause: the watchdog (check 6), kill -9 (check 8) --------
# ExecStopPost=nixfleet-agent record-exit keeps systemd's verdict (SERVICE_RESULT=watchdog;
# EXIT_CODE=killed EXIT_STATUS=KILL) for the next start, which words it in "Agent started".
started_with() { control GET /_fake/requests | grep -o '"output":"Agent started[^"]*' | grep -F -- "$1" >/dev/null; }
if ! wait_until 10 started_with "after the systemd watchdog killed a wedged agent"; then
  fail restart-causes "no 'Agent started (...): after the systemd watchdog killed a wedged agent' after check 6's watchdog restart: $(control GET /_fake/requests | grep -o '"output":"Agent started[^"]*' | tail -3)"
elif ! wait_until 10 started_with "after the agent was killed (signal KILL)"; then
  fail restart-causes "no 'Agent started (...): after the agent was killed (signal KILL)' after check 8's kill -9: $(control GET /_fake/requests | grep -o '"output":"Agent started[^"]*' | tail -3)"
else
  pass restart-causes "$(control GET /_fake/requests | grep -o '"output":"Agent started[^"]*' | sed 's/^"output":"//' | tail -3 | paste -sd '|' | cut -c1-220)"
fi

# ---- 9. systemctl stop ends it cleanly ---------------------------------------------------------
stop_limit=$(usec_to_s "$(prop TimeoutStopUSec)")
t0=$(date +%s.%N)
out=$(CT_TIMEOUT=$(awk -v a="$stop_limit" 'BEGIN{print int(a)+10}') ct systemctl stop "$unit" 2>&1); rc=$?
stop_s=$(elapsed "$t0")
stopped_line() { journal_has "stopped (exit code 0)"; }
if [ $rc -ne 0 ]; then
  fail stop "systemctl stop failed (exit $rc) after ${stop_s}s: $out"
elif [ "$(prop ActiveState)" != inactive ] || [ "$(prop Result)" != success ]; then
  fail stop "after stop: ActiveState=$(prop ActiveState) Result=$(prop Result) ExecMainStatus=$(prop ExecMainStatus)"
elif ! wait_until 3 stopped_line; then
  fail stop "no 'stopped (exit code 0)' line in the journal"
elif awk -v a="$stop_s" -v b="$stop_limit" 'BEGIN{exit !(a>=b)}'; then
  fail stop "stop took ${stop_s}s, not less than TimeoutStopSec=${stop_limit}s"
else
  pass stop "stopped in ${stop_s}s (TimeoutStopSec=${stop_limit}s), Result=success, exit code 0"
fi

# ---- 10. a config error (78) is not restarted in a loop -----------------------------------------
ct sh -c "cat > /etc/systemd/system/$unit.d/90-bad-interval.conf" <<'EOF'
[Service]
Environment=NIXFLEET_INTERVAL=0
EOF
ct systemctl daemon-reload
ct systemctl reset-failed "$unit" 2>/dev/null
out=$(CT_TIMEOUT=20 ct systemctl start "$unit" 2>&1); rc=$?
n0=$(prop NRestarts)
sleep 5
st=$(prop ExecMainStatus) state=$(prop ActiveState) n1=$(prop NRestarts)
if [ $rc -eq 0 ]; then
  fail config-error "systemctl start succeeded with NIXFLEET_INTERVAL=0 (state $state)"
elif [ "$st" != 78 ]; then
  fail config-error "exit status $st, expected 78 (state $state, Result $(prop Result))"
elif [ "$n1" != 0 ] || [ "$state" != failed ]; then
  fail config-error "restarted after exit 78: NRestarts $n0 -> $n1 after 5 s, state $state"
else
  pass config-error "start failed, exit status 78, state failed, NRestarts 0 after 5 s: $(journal | grep -m1 'configuration error' | cut -c1-100)"
fi
ct rm -f "/etc/systemd/system/$unit.d/90-bad-interval.conf"

# ---- 11. a switch in its own transient unit survives a watchdog kill of the agent -------------
# A stand-in nixos-rebuild on the unit's PATH (/run/current-system/sw/bin; isolation and switch
# mode are left at auto) that runs until this script releases it, so the order is fixed: the
# agent is SIGSTOPped while the switch unit runs, the watchdog kills it, systemd restarts it, the
# new instance finds the switch still running and waits for it; only then does the switch end.
# The switch unit is in its own cgroup, so neither the kill nor the restart touches it.
t11=$(date +%s.%N)
marker=/var/lib/ci/switch-done release=/run/nixfleet-ci-release
ct mkdir -p /run/current-system/sw/bin
ct sh -c 'cat > /run/current-system/sw/bin/nixos-rebuild; chmod 755 /run/current-system/sw/bin/nixos-rebuild' <<EOF
#!/bin/sh
# Waits for $release (at most 60 s, so it can never hang the run), then "activates".
i=0
while [ ! -e $release ] && [ \$i -lt 600 ]; do sleep 0.1; i=\$((i + 1)); done
touch $marker
echo "activated by stand-in (\$*)"
EOF
ct rm -f "$marker" "$release"
# Check 10 left the unit failed (exit 78) and removed its drop-in: start it again, cleanly.
ct systemctl daemon-reload
ct systemctl reset-failed "$unit" 2>/dev/null
switch_units() { # the loaded transient switch units, one name a line
  ct systemctl list-units --all --plain --no-legend 'nixfleet-switch-*' 2>/dev/null | awk '{print $1}'
}
switch_active() { [ -n "$(ct systemctl list-units --state=active --plain --no-legend 'nixfleet-switch-*' 2>/dev/null)" ]; }
outputs() { control GET /_fake/requests | grep -o '"output":"[^"]*' | sed 's/^"output":"//'; }
count_outputs() { outputs | grep -c "^$1"; } # statuses whose output starts with $1
switch_reported() { [ "$(count_outputs 'Switch: ')" -ge 1 ]; }
registers() { control GET /_fake/requests | grep -o '"endpoint":"register"' | grep -c .; }
registers_above() { [ "$(registers)" -gt "$1" ]; }
wd_count() { journal | grep -c "Failed with result 'watchdog'"; }
wd_above() { [ "$(wd_count)" -gt "$1" ]; }
marker_there() { ct test -e "$marker"; }
no_switch_units() { [ -z "$(switch_units)" ]; }
resumed() { journal_has 'left a switch running outside the agent'; }
switch_row() { control GET /_fake/logs/cthost | grep -o '{[^{}]*"command":"switch"[^{}]*}' | tail -1; }
switch_row_closed() { switch_row | grep -q '"completed_at":"'; }
out=$(ct systemctl start "$unit" 2>&1); rc=$?
if [ $rc -ne 0 ] || ! wait_until 10 status_ok; then
  fail switch-survives-watchdog "could not start the agent again (exit $rc: $out), state $(prop ActiveState)/$(prop SubState), StatusText '$(prop StatusText)'"
elif [ -n "$(switch_units)" ] || [ "$(count_outputs 'Switch')" != 0 ]; then
  fail switch-survives-watchdog "not a clean start: switch units '$(switch_units)', $(count_outputs 'Switch') 'Switch...' reports already"
else
  pid=$(prop MainPID) n0=$(prop NRestarts) w0=$(wd_count)
  out=$(control POST /_fake/command/cthost '{"command":"switch","force":true}' 2>&1)
  if ! grep -q '"forced"' <<<"$out"; then
    fail switch-survives-watchdog "queueing switch through the control API failed: $out"
  elif ! wait_until 10 switch_active; then
    fail switch-survives-watchdog "no active nixfleet-switch-* unit 10 s after queueing switch: $(journal | grep -i switch | tail -3)"
  else
    sw_unit=$(switch_units | head -1) && sw_unit=${sw_unit%.service}
    sw_pid=$(ct systemctl show -P MainPID "$sw_unit")
    t0=$(date +%s.%N)
    [ "${pid:-0}" -gt 1 ] && ct kill -STOP "$pid"
    if ! wait_until "$(awk -v a="$wd_s" 'BEGIN{print a+5}')" wd_above "$w0"; then
      fail switch-survives-watchdog "no new \"Failed with result 'watchdog'\" within WatchdogSec+5 s after SIGSTOP of pid $pid"
      [ "${pid:-0}" -gt 1 ] && ct kill -CONT "$pid" 2>/dev/null
    else
      wd_after=$(elapsed "$t0")
      r0=$(registers) # the old instance is dead: later registers come from the new one
      # Right after the kill: the same switch unit with the same wrapper, not finished.
      sw_state=$(ct systemctl show -P ActiveState "$sw_unit") sw_pid_now=$(ct systemctl show -P MainPID "$sw_unit")
      if [ "$sw_state" != active ] || [ "$sw_pid_now" != "$sw_pid" ] || marker_there; then
        fail switch-survives-watchdog "after the watchdog kill (${wd_after}s after SIGSTOP) $sw_unit is '$sw_state' with MainPID '$sw_pid_now' (was $sw_pid); the switch died with the agent"
      elif ! wait_until "$(awk -v a="$restart_s" 'BEGIN{print a+10}')" nrestarts_above "$n0"; then
        fail switch-survives-watchdog "NRestarts still $(prop NRestarts) RestartSec+10 s after the watchdog kill"
      elif ! wait_until 10 is_active_with_new_pid "$pid"; then
        fail switch-survives-watchdog "not active/running with a new pid: $(prop ActiveState)/$(prop SubState) pid $(prop MainPID)"
      elif ! wait_until 10 resumed; then
        fail switch-survives-watchdog "the restarted agent (pid $(prop MainPID)) did not pick up the running switch (no 'left a switch running outside the agent' line)"
      elif [ "$(ct systemctl show -P ActiveState "$sw_unit")" != active ]; then
        fail switch-survives-watchdog "$sw_unit is $(ct systemctl show -P ActiveState "$sw_unit") before the stand-in was released"
      else
        # Once the new instance has sent a heartbeat (register), every status it queued at
        # start has been delivered (reports go first); the switch is still running, so the
        # dashboard's row for it must still be open.
        t_res=$(date +%s.%N)
        wait_until 10 registers_above "$r0"
        row_at_restart=$(switch_row)
        # Keep the switch running long enough for the waiting agent's liveness check of the
        # unit (every 5 s) to run at least once before it ends.
        sleep "$(awk -v a="$(elapsed "$t_res")" 'BEGIN{d=6-a; print (d>0?d:0)}')"
        t_wait=$(elapsed "$t_res")
        ct touch "$release"
        if ! wait_until 10 marker_there; then
          fail switch-survives-watchdog "the stand-in never finished after its release (no $marker); $sw_unit is $(ct systemctl show -P ActiveState "$sw_unit")"
        elif ! wait_until 10 switch_reported; then
          fail switch-survives-watchdog "no status 'Switch: ...' at the dashboard 10 s after the switch finished: $(outputs | tail -5)"
        elif ! wait_until 10 switch_row_closed; then
          fail switch-survives-watchdog "the dashboard's switch row is still open: $(switch_row)"
        elif ! wait_until 10 no_switch_units; then
          fail switch-survives-watchdog "the transient unit was not collected: $(ct systemctl list-units --all --no-pager 'nixfleet-switch-*')"
        else
          sleep 2 # a second report would come within the agent's interval (2 s)
          reports=$(outputs | grep '^Switch')
          row=$(switch_row)
          jfields=$(ct journalctl -b -u "$unit" --no-pager -o cat NIXFLEET_COMMAND=switch)
          if [ "$(grep -c '^Switch: ' <<<"$reports")" != 1 ] || [ "$(grep -c . <<<"$reports")" != 1 ]; then
            fail switch-survives-watchdog "expected exactly one 'Switch: ' status and no other 'Switch...' status, got: $reports"
          elif ! grep -qF 'activated by stand-in (switch --flake .#cthost)' <<<"$reports"; then
            fail switch-survives-watchdog "the Switch report lacks the stand-in's output: $reports"
          elif ! grep -q '"status":"running"' <<<"$row_at_restart"; then
            fail switch-survives-watchdog "while the switch was still running, the restarted agent's first status closed the dashboard's switch row: $row_at_restart (final 'Switch: ' report landed in no row)"
          elif ! grep -q '"status":"ok"' <<<"$row" || ! grep -q '"output":"Switch: ' <<<"$row"; then
            fail switch-survives-watchdog "the dashboard's switch row is not closed by the switch report with status ok: $row"
          elif ! journal_has "switch runs in transient unit $sw_unit (systemd-run)"; then
            fail switch-survives-watchdog "no 'switch runs in transient unit $sw_unit (systemd-run)' line in the agent's journal"
          elif [ -z "$jfields" ]; then
            fail switch-survives-watchdog "journalctl -u $unit NIXFLEET_COMMAND=switch is empty"
          else
            pass switch-survives-watchdog "$sw_unit (wrapper pid $sw_pid) kept running through the watchdog kill ${wd_after}s after SIGSTOP and the restart (NRestarts $n0 -> $(prop NRestarts)); the new agent waited on the running unit for ${t_wait}s and reported once: '$(cut -c1-60 <<<"$reports")', row ok, unit collected, $(grep -c . <<<"$jfields") entries with NIXFLEET_COMMAND=switch; $(elapsed "$t11")s"
          fi
        fi
      fi
    fi
  fi
fi

# ---- 12. a switch that changes the agent's own unit: reported, exit 10, new unit started -------
# NixOS does not restart the agent during its switch (restartIfChanged = false); the agent
# compares its unit file after the switch (NIXFLEET_RESTART_ON_CHANGE in the shipped unit). The
# stand-in nixos-rebuild edits the unit as switch-to-configuration would (a new Environment=
# line, then daemon-reload); the agent reports the switch, exits 10, and systemd
# (RestartForceExitStatus=10) starts the new definition, which registers with the new location.
t12=$(date +%s.%N)
ct sh -c 'cat > /run/current-system/sw/bin/nixos-rebuild; chmod 755 /run/current-system/sw/bin/nixos-rebuild' <<EOF
#!/bin/sh
sed -i '/^\[Service\]/a Environment=NIXFLEET_LOCATION=ci-rack-2' /etc/systemd/system/$unit
systemctl daemon-reload
echo "activated new unit (\$*)"
EOF
new_location_registered() { control GET /_fake/requests | grep -q '"location":"ci-rack-2"'; }
exited_10() { journal | grep -E 'status=10(/|$| )' >/dev/null; }
pid=$(prop MainPID) n0=$(prop NRestarts) s0=$(count_outputs 'Switch: activated new unit')
if [ "$(prop ActiveState)" != active ] || ! wait_until 10 status_ok; then
  fail restart-on-unit-change "the agent is not running before the check: $(prop ActiveState)/$(prop SubState)"
elif new_location_registered; then
  fail restart-on-unit-change "not a clean start: location ci-rack-2 registered already"
else
  out=$(control POST /_fake/command/cthost '{"command":"switch","force":true}' 2>&1)
  if ! grep -q '"forced"' <<<"$out"; then
    fail restart-on-unit-change "queueing switch through the control API failed: $out"
  elif ! wait_until 30 nrestarts_above "$n0"; then
    fail restart-on-unit-change "NRestarts still $(prop NRestarts) 30 s after a switch that changed the unit; state $(prop ActiveState)/$(prop SubState), reports: $(outputs | tail -3)"
  elif ! wait_until 15 is_active_with_new_pid "$pid"; then
    fail restart-on-unit-change "not active/running with a new pid: $(prop ActiveState)/$(prop SubState) pid $(prop MainPID)"
  elif ! wait_until 15 new_location_registered; then
    fail restart-on-unit-change "the restarted agent (pid $(prop MainPID)) never registered with NIXFLEET_LOCATION from the new unit"
  elif [ "$(count_outputs 'Switch: activated new unit')" != $((s0 + 1)) ]; then
    fail restart-on-unit-change "expected exactly one new 'Switch: activated new unit' report, got $(count_outputs 'Switch: activated new unit') (was $s0): $(outputs | tail -5)"
  elif ! journal_has "changed the agent's service definition"; then
    fail restart-on-unit-change "no 'changed the agent's service definition' line in the journal"
  elif ! exited_10; then
    fail restart-on-unit-change "systemd did not log the main process exiting with status 10: $(journal | grep -i 'main process' | tail -2)"
  else
    pass restart-on-unit-change "switch reported once, exit 10, NRestarts $n0 -> $(prop NRestarts), new pid $(prop MainPID) registered with the new unit's location; $(elapsed "$t12")s"
  fi
fi

# ---- 12b. a unit changed by someone else (no agent command): the agent follows it -------------
# A hand edit (or another deploy tool) changes the unit's Environment=; nothing tells the agent.
# Within one heartbeat interval it notices (a stat of the NIXFLEET_RESTART_ON_CHANGE files), but
# restarting before `daemon-reload` would start the old definition again: it waits until systemd
# has loaded the new one (NeedDaemonReload=no), then exits 10 and comes back with the new value.
t12b=$(date +%s.%N)
followed_registered() { control GET /_fake/requests | grep -q '"location":"ci-followed"'; }
pid=$(prop MainPID) n0=$(prop NRestarts)
if [ "$(prop ActiveState)" != active ] || ! wait_until 10 status_ok; then
  fail follows-unit-change "the agent is not running before the check: $(prop ActiveState)/$(prop SubState)"
else
  ct sed -i -e '/^Environment=NIXFLEET_LOCATION=/d' \
    -e '/^\[Service\]/a Environment=NIXFLEET_LOCATION=ci-followed' /etc/systemd/system/$unit
  waiting_logged() { journal_has 'waiting for `systemctl daemon-reload`'; }
  if ! wait_until 10 waiting_logged; then
    fail follows-unit-change "no 'waiting for \`systemctl daemon-reload\`' line 10 s after the unit changed (NeedDaemonReload=$(prop NeedDaemonReload)): $(journal | tail -3)"
  elif [ "$(prop MainPID)" != "$pid" ] || [ "$(prop NRestarts)" != "$n0" ]; then
    fail follows-unit-change "the agent restarted before daemon-reload (pid $pid -> $(prop MainPID)): systemd would start the old definition"
  else
    t_reload=$(date +%s.%N)
    ct systemctl daemon-reload
    if ! wait_until 15 nrestarts_above "$n0"; then
      fail follows-unit-change "NRestarts still $(prop NRestarts) 15 s after daemon-reload; state $(prop ActiveState)/$(prop SubState); $(journal | tail -3)"
    elif ! wait_until 15 is_active_with_new_pid "$pid"; then
      fail follows-unit-change "not active/running with a new pid: $(prop ActiveState)/$(prop SubState) pid $(prop MainPID)"
    elif ! wait_until 15 followed_registered; then
      fail follows-unit-change "the restarted agent (pid $(prop MainPID)) never registered with NIXFLEET_LOCATION=ci-followed from the changed unit"
    elif ! wait_until 10 started_with "after a change made outside the agent (service definition /etc/systemd/system/$unit changed)"; then
      fail follows-unit-change "no 'Agent started (...): after a change made outside the agent (...)' report: $(control GET /_fake/requests | grep -o '"output":"Agent started[^"]*' | tail -2)"
    else
      pass follows-unit-change "noticed, waited for daemon-reload, then exit 10 -> new pid $(prop MainPID) registered location ci-followed $(elapsed "$t_reload")s after daemon-reload; $(elapsed "$t12b")s"
    fi
  fi
fi

# ---- 13. home-manager host: the user unit's switch runs in a transient unit of the user manager
# units/user/nixfleet-agent.service, unchanged but for the binary path, under root's user
# manager (user@0.service; the container has no logind, so its PAM stack and XDG_RUNTIME_DIR are
# set up by hand). The agent finds that it runs under a user manager and starts the
# home-manager switch with `systemd-run --user`; kill -9 of the agent leaves that unit running,
# and the restarted agent reports it once.
t13=$(date +%s.%N)
uunit_src=$repo/units/user/nixfleet-agent.service
uctl() { ct env XDG_RUNTIME_DIR=/run/user/0 systemctl --user "$@"; }
uprop() { uctl show -P "$1" nixfleet-agent.service 2>/dev/null; }
ujournal() { ct journalctl -b --no-pager -o cat _SYSTEMD_USER_UNIT=nixfleet-agent.service 2>/dev/null; }
ujournal_has() { ujournal | grep -F -- "$1" >/dev/null; }
user_switch_units() { uctl list-units --all --plain --no-legend 'nixfleet-switch-*' 2>/dev/null | awk '{print $1}'; }
user_switch_active() { [ -n "$(uctl list-units --state=active --plain --no-legend 'nixfleet-switch-*' 2>/dev/null)" ]; }
uactive_with_new_pid() { local p; [ "$(uprop ActiveState)" = active ] && p=$(uprop MainPID) && [ "$p" != 0 ] && [ "$p" != "$1" ]; }
unrestarts_above() { [ "$(uprop NRestarts)" -gt "$1" ]; }
home_outputs() { # outputs of the statuses cthome delivered, one a line
  control GET /_fake/requests | python3 -c 'import json, sys
for r in json.load(sys.stdin):
    if r.get("host_id") == "cthome" and r.get("endpoint") == "status" and r.get("response_status") == 200:
        print((r.get("body") or {}).get("output") or "")'
}
home_switch_reports() { home_outputs | grep -c '^Switch: '; }
home_row() { control GET /_fake/logs/cthome | grep -o '{[^{}]*"command":"switch"[^{}]*}' | tail -1; }
hmarker=/var/lib/ci/home-switch-done hrelease=/run/nixfleet-ci-home-release
ct systemctl stop "$unit" 2>/dev/null # one agent at a time keeps the dashboard log readable
ct mkdir -p /etc/pam.d /etc/systemd/system/user@0.service.d /etc/systemd/user \
  /root/.config/nixfleet /root/.nix-profile/bin
ct sh -c 'printf "auth required pam_permit.so\naccount required pam_permit.so\nsession required pam_permit.so\n" > /etc/pam.d/systemd-user'
ct sh -c 'printf "[Service]\nEnvironment=XDG_RUNTIME_DIR=/run/user/0\n" > /etc/systemd/system/user@0.service.d/ci.conf'
sed -E 's#^(ExecStart|ExecStopPost)=([-@:+!]*)[^ ]*/nixfleet-agent( |$)#\1=\2/opt/ci/nixfleet-agent\3#' \
  "$uunit_src" > "$work/user-$unit"
ct sh -c "cat > /etc/systemd/user/$unit" < "$work/user-$unit"
ct sh -c 'umask 077; echo shared-secret-token > /root/.config/nixfleet/agent.token'
ct sh -c 'cat > /root/.config/nixfleet/agent.env' <<'EOF'
NIXFLEET_URL=http://127.0.0.1:8000
NIXFLEET_ALLOW_INSECURE_HTTP=1
NIXFLEET_HOSTNAME=cthome
NIXFLEET_NIXCFG=/var/lib/ci/nixcfg
NIXFLEET_INTERVAL=2
EOF
ct sh -c 'cat > /root/.nix-profile/bin/home-manager; chmod 755 /root/.nix-profile/bin/home-manager' <<EOF
#!/bin/sh
i=0
while [ ! -e $hrelease ] && [ \$i -lt 600 ]; do sleep 0.1; i=\$((i + 1)); done
touch $hmarker
echo "activated home by stand-in (\$*)"
EOF
ct rm -f "$hmarker" "$hrelease"
if [ "$(diff "$uunit_src" "$work/user-$unit" | grep -c '^[<>]')" != 4 ]; then
  fail user-switch-survives-kill9 "could not rewrite only ExecStart= and ExecStopPost= in $uunit_src: $(diff "$uunit_src" "$work/user-$unit")"
elif ! ct systemctl daemon-reload || ! ct systemctl start user-runtime-dir@0.service user@0.service; then
  fail user-switch-survives-kill9 "could not start root's user manager: $(ct systemctl status user@0.service --no-pager 2>&1 | tail -5)"
elif ! uctl start "$unit" || ! wait_until 10 ujournal_has "nixfleet-agent starting"; then
  fail user-switch-survives-kill9 "the user unit did not start: $(uprop ActiveState)/$(uprop SubState); $(ujournal | tail -3)"
else
  upid=$(uprop MainPID) un0=$(uprop NRestarts)
  out=$(control POST /_fake/command/cthome '{"command":"switch","force":true}' 2>&1)
  if ! grep -q '"forced"' <<<"$out"; then
    fail user-switch-survives-kill9 "queueing switch for cthome failed: $out"
  elif ! wait_until 15 user_switch_active; then
    fail user-switch-survives-kill9 "no active nixfleet-switch-* unit in the user manager 15 s after queueing: $(ujournal | grep -i switch | tail -3)"
  else
    usw=$(user_switch_units | head -1) && usw=${usw%.service}
    usw_pid=$(uctl show -P MainPID "$usw")
    [ "${upid:-0}" -gt 1 ] && ct kill -KILL "$upid"
    sleep 1
    if [ "$(uctl show -P ActiveState "$usw")" != active ] || ct test -e "$hmarker"; then
      fail user-switch-survives-kill9 "after kill -9 of the agent (pid $upid) $usw is $(uctl show -P ActiveState "$usw"): the switch died with the agent"
    elif ! wait_until 20 unrestarts_above "$un0" || ! wait_until 10 uactive_with_new_pid "$upid"; then
      fail user-switch-survives-kill9 "the user unit was not restarted: NRestarts $(uprop NRestarts), $(uprop ActiveState)/$(uprop SubState)"
    elif ! wait_until 10 ujournal_has "left a switch running outside the agent"; then
      fail user-switch-survives-kill9 "the restarted agent did not pick up the running switch"
    else
      # Keep the switch running long enough for the waiting agent's liveness check
      # (`systemctl --user show`, every 5 s) to run at least once before it ends.
      sleep 6
      ct touch "$hrelease"
      if ! wait_until 15 eval '[ "$(home_switch_reports)" -ge 1 ]'; then
        fail user-switch-survives-kill9 "no 'Switch: ' status for cthome after the release: $(home_outputs | tail -5)"
      else
        sleep 2 # a second report would come within the agent's interval (2 s)
        reports=$(home_outputs | grep '^Switch')
        row=$(home_row)
        if [ "$(grep -c . <<<"$reports")" != 1 ] || ! grep -qF 'activated home by stand-in (switch --flake .#root@cthome)' <<<"$reports"; then
          fail user-switch-survives-kill9 "expected exactly one 'Switch: activated home by stand-in (switch --flake .#root@cthome)' report, got: $reports"
        elif ! grep -q '"status":"ok"' <<<"$row" || ! grep -q '"output":"Switch: ' <<<"$row"; then
          fail user-switch-survives-kill9 "the dashboard's switch row for cthome is not closed by the switch report: $row"
        elif ujournal_has "ended without a result"; then
          fail user-switch-survives-kill9 "the waiting agent declared the running switch lost: $(ujournal | grep 'without a result' | tail -1)"
        elif ! ujournal_has "switch runs in transient unit $usw (systemd-run --user)"; then
          fail user-switch-survives-kill9 "no 'switch runs in transient unit $usw (systemd-run --user)' line in the user unit's journal"
        elif ! wait_until 10 eval '[ -z "$(user_switch_units)" ]'; then
          fail user-switch-survives-kill9 "the user transient unit was not collected: $(user_switch_units)"
        else
          pass user-switch-survives-kill9 "$usw (wrapper pid $usw_pid) in the user manager kept running through kill -9 of the agent; NRestarts $un0 -> $(uprop NRestarts); reported once: '$(cut -c1-70 <<<"$reports")', row ok, unit collected; $(elapsed "$t13")s"
        fi
      fi
    fi
  fi
fi

echo "total $(elapsed "$T0") s"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
