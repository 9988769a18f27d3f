#!/usr/bin/env bash
# `scripts/check-packaging --live`: the real units under a real systemd (PID 1 in a
# systemd-nspawn container, plus a user manager for alice), with fake-agent.py as the agent.
# Prints `ok NAME` / `FAIL NAME: detail` lines; about 70 s. Needs root, systemd-container and
# ct.sh, the repository's real-systemd recipe ($CT_SH, default tests/systemd/ct.sh).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
ct_sh=${CT_SH:-$root/tests/systemd/ct.sh}
[ -r "$ct_sh" ] || { echo "FAIL live systemd: $ct_sh not found (set CT_SH)"; exit 0; }
# shellcheck source=/dev/null
. "$ct_sh"

check() { # NAME CONDITION-COMMAND DETAIL
  if eval "$2"; then echo "ok live: $1"; else echo "FAIL live: $1: $3"; fi
}
wait_for() { local _; for _ in $(seq 150); do eval "$1" && return 0; sleep 0.2; done; return 1; }

ct_boot "nfa-live-$$" --bind-ro="$here/fake-agent.py:/opt/ci/nixfleet-agent" \
  --bind-ro=/etc/pam.d --bind-ro=/etc/security --bind-ro=/etc/alternatives >/dev/null 2>&1 \
  || { echo "FAIL live: container boot (see /tmp/nfa-live-$$.nspawn.log)"; exit 0; }

# --- system unit ---------------------------------------------------------------------------
ct mkdir -p /etc/systemd/system /etc/nixfleet-agent
sed 's|^ExecStart=/usr/local/bin/nixfleet-agent|ExecStart=/opt/ci/nixfleet-agent|' \
  "$root/units/nixfleet-agent.service" | ct sh -c 'cat > /etc/systemd/system/nixfleet-agent.service'
ct sh -c 'umask 077; echo secret-token > /etc/nixfleet-agent/token
  echo NIXFLEET_URL=https://fleet.example.com > /etc/nixfleet-agent/env; echo run > /etc/nixfleet-agent/mode'
out=$(ct systemd-analyze verify --man=no /etc/systemd/system/nixfleet-agent.service 2>&1)
check "system unit: verify under PID 1 is silent" '[ -z "$out" ]' "$out"
ct systemctl daemon-reload
show() { ct systemctl show -P "$1" nixfleet-agent.service; }
fake() { ct journalctl -b -u nixfleet-agent.service --no-pager -o cat | grep '^FAKE'; }
restarted_after() { wait_for '[ "$(show NRestarts)" -gt '"$1"' ] && [ "$(show ActiveState)" = active ]'; }

ct systemctl start nixfleet-agent.service
check "system unit: Type=notify start -> active" '[ "$(show ActiveState)" = active ]' "$(show ActiveState)"
check "system unit: STATUS= text" '[ "$(show StatusText)" = "fake agent ready" ]' "$(show StatusText)"
log=$(fake)
for want in "token_ok=True" "url=https://fleet.example.com" "umask=0077" "home=/root user=root" \
  "state=/var/lib/nixfleet-agent state_mode=700 runtime=/run/nixfleet-agent runtime_mode=700" \
  "watchdog_usec=60000000" "cache_mode=600" "path=/run/wrappers/bin:" "core_limit=(0, 0)"; do
  check "system unit: agent sees $want" 'grep -qF "FAKE $want" <<<"$log"' "$(tr '\n' ' ' <<<"$log")"
done
for code in 0 10 1 70 73 75; do
  n=$(show NRestarts); ct sh -c "echo 'exit $code' > /etc/nixfleet-agent/mode"
  check "system unit: exit $code is restarted" "restarted_after $n" "$(show ActiveState)/$(show SubState)"
done
n=$(show NRestarts); ct sh -c "echo 'exit 78' > /etc/nixfleet-agent/mode"; sleep 7
check "system unit: exit 78 stays down" '[ "$(show ActiveState)" = failed ] && [ "$(show NRestarts)" = "$n" ]' \
  "$(show ActiveState), NRestarts $n -> $(show NRestarts)"
ct systemctl reset-failed nixfleet-agent.service
ct mkdir -p /etc/systemd/system/nixfleet-agent.service.d
ct sh -c 'printf "[Service]\nWatchdogSec=3\nTimeoutStopSec=5\n" > /etc/systemd/system/nixfleet-agent.service.d/fast.conf'
ct systemctl daemon-reload
ct systemctl start nixfleet-agent.service
n=$(show NRestarts); ct kill -STOP "$(show MainPID)"
check "system unit: a frozen agent is restarted by the watchdog" \
  "restarted_after $n && ct journalctl -b -u nixfleet-agent.service --no-pager | grep -q \"Failed with result 'watchdog'\"" \
  "$(show ActiveState)"
n=$(show NRestarts); ct kill -KILL "$(show MainPID)"
check "system unit: kill -9 is restarted" "restarted_after $n" "$(show ActiveState)"
before=$(fake | grep -c 'child got SIGTERM')
ct systemctl stop nixfleet-agent.service
after=$(fake | grep -c 'child got SIGTERM')
check "system unit: stop is clean (exit 0, not restarted)" '[ "$(show ActiveState)" = inactive ] && [ "$(show Result)" = success ]' \
  "$(show ActiveState)/$(show Result)"
check "system unit: KillMode=mixed (no SIGTERM to children, SIGKILL after the agent)" '[ "$after" = "$before" ]' \
  "children got SIGTERM"
check "system unit: runtime dir removed, state kept" \
  '! ct test -e /run/nixfleet-agent && ct test -f /var/lib/nixfleet-agent/token' "$(ct ls /run /var/lib/nixfleet-agent 2>&1 | tr '\n' ' ')"

# --- user unit -----------------------------------------------------------------------------
H=/home/alice
as_alice() { ct setpriv --reuid=1000 --regid=1000 --init-groups env HOME=$H XDG_RUNTIME_DIR=/run/user/1000 sh -c "$*"; }
ct useradd -m -u 1000 alice
as_alice "mkdir -p $H/.nix-profile/bin $H/.config/systemd/user
  ln -s /opt/ci/nixfleet-agent $H/.nix-profile/bin/nixfleet-agent
  install -d -m 0700 $H/.config/nixfleet
  umask 077; echo secret-token > $H/.config/nixfleet/agent.token
  printf 'NIXFLEET_URL=https://fleet.example.com\nFAKE_MODE_FILE=$H/mode\n' > $H/.config/nixfleet/agent.env
  echo run > $H/mode"
as_alice "cat > $H/.config/systemd/user/nixfleet-agent.service" < "$root/units/user/nixfleet-agent.service"
ct loginctl enable-linger alice
wait_for 'ct test -S /run/user/1000/systemd/private'
ushow() { as_alice "systemctl --user show -P $1 nixfleet-agent.service"; }
out=$(as_alice "systemd-analyze --user verify --man=no $H/.config/systemd/user/nixfleet-agent.service" 2>&1)
check "user unit: verify under a user manager is silent" '[ -z "$out" ]' "$out"
as_alice "systemctl --user daemon-reload; systemctl --user start nixfleet-agent.service"
check "user unit: Type=notify start -> active" '[ "$(ushow ActiveState)" = active ]' "$(ushow ActiveState)"
ulog=$(ct journalctl -b --no-pager -o cat _UID=1000 | grep '^FAKE')
for want in "token_ok=True" "url=https://fleet.example.com" "umask=0077" "home=$H user=alice" \
  "runtime=/run/user/1000/nixfleet-agent runtime_mode=700" "cache_mode=600" "core_limit=(0, 0)"; do
  check "user unit: agent sees $want" 'grep -qF "$want" <<<"$ulog"' "$(tr '\n' ' ' <<<"$ulog")"
done
n=$(ushow NRestarts); as_alice "echo 'exit 10' > $H/mode"
check "user unit: exit 10 is restarted" \
  'wait_for "[ \"\$(ushow NRestarts)\" -gt $n ] && [ \"\$(ushow ActiveState)\" = active ]"' "$(ushow ActiveState)"
as_alice "echo 'exit 78' > $H/mode"; sleep 7
check "user unit: exit 78 stays down" '[ "$(ushow ActiveState)" = failed ]' "$(ushow ActiveState)"
check "user unit: the token file and the state dir do not share a directory" \
  '[ "$(as_alice "readlink -f $H/.config/nixfleet/agent.token")" != "$(as_alice "readlink -f \$(ls -d $H/.local/state/nixfleet-agent $H/.config/nixfleet-agent 2>/dev/null | head -1)/token")" ]' \
  "collision"
ct_stop
