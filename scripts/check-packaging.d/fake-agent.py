#!/usr/bin/python3
"""Stand-in for nixfleet-agent in `scripts/check-packaging --live`: a Type=notify service that
logs what the unit gave it (lines starting with FAKE), so the driver can check the real unit
under a real systemd. It follows the agent's interface where the unit depends on it:

* READY=1 after start, WATCHDOG=1 every 0.5 s unless the mode file says `wedge`;
* token from $CREDENTIALS_DIRECTORY/token, else $NIXFLEET_TOKEN_FILE; writes a token cache;
* on SIGTERM, STOPPING=1 and exit 0, leaving its child alone (the agent stops children itself);
* a child in its own process group that logs any SIGTERM it receives (KillMode= check);
* `exit N` in the mode file ($FAKE_MODE_FILE): reset the file to `run`, exit N.
"""
import os
import resource
import signal
import socket
import subprocess
import sys
import time

MODE = os.environ.get("FAKE_MODE_FILE", "/etc/nixfleet-agent/mode")


def notify(msg):
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(addr)
        s.sendall(msg.encode())


def log(*args):
    print("FAKE", *args, flush=True)


def mode():
    try:
        with open(MODE) as f:
            return f.read().strip()
    except OSError:
        return "run"


def mode_bits(path):
    return "%o" % (os.stat(path).st_mode & 0o777)


cred = os.environ.get("CREDENTIALS_DIRECTORY")
token_file = os.path.join(cred, "token") if cred else os.environ.get("NIXFLEET_TOKEN_FILE")
token = open(token_file).read().strip() if token_file else None
log(f"token_ok={token == 'secret-token'}")
log(f"url={os.environ.get('NIXFLEET_URL')}")
state, runtime = os.environ["STATE_DIRECTORY"], os.environ["RUNTIME_DIRECTORY"]
log(f"state={state} state_mode={mode_bits(state)} runtime={runtime} runtime_mode={mode_bits(runtime)}")
umask = os.umask(0)
os.umask(umask)
log(f"umask={umask:04o}")
log(f"core_limit={resource.getrlimit(resource.RLIMIT_CORE)}")
log(f"home={os.environ.get('HOME')} user={os.environ.get('USER')}")
log(f"path={os.environ.get('PATH')}")
log(f"watchdog_usec={os.environ.get('WATCHDOG_USEC')}")
with open(os.path.join(state, "token"), "w") as f:
    f.write("NIXFLEET_TOKEN=cached\n")
log(f"cache_mode={mode_bits(os.path.join(state, 'token'))}")

child = subprocess.Popen(
    [sys.executable, "-c",
     "import signal, sys, time\n"
     "def h(*a):\n"
     "    print('FAKE child got SIGTERM', flush=True)\n"
     "    sys.exit(0)\n"
     "signal.signal(signal.SIGTERM, h)\n"
     "time.sleep(1000)\n"],
    process_group=0)


def on_term(*_):
    log("main got SIGTERM, exiting 0")
    notify("STOPPING=1")
    sys.exit(0)


signal.signal(signal.SIGTERM, on_term)
notify("READY=1\nSTATUS=fake agent ready")
watchdog = int(os.environ.get("WATCHDOG_USEC", "0"))
while True:
    m = mode()
    if m.startswith("exit"):
        with open(MODE, "w") as f:
            f.write("run\n")
        log(f"exiting with {m.split()[1]}")
        sys.exit(int(m.split()[1]))
    if m != "wedge" and watchdog:
        notify("WATCHDOG=1")
    time.sleep(0.5)
