# NixOS VM test for pkgs.testers.runNixOSTest: the NixOS module against the workspace's fake
# dashboard. Proves Type=notify start, registration, a command round trip, both restart paths
# (a killed agent, and a frozen one caught by the watchdog), no core dumps, and the wiring of
# the metrics file into node-exporter's textfile collector.
#
# The test script runs its shell commands under `set -o pipefail`: a pipe into a reader that
# stops early (`| grep -q`) can fail the writer with SIGPIPE. So commands here print, and Python
# decides.
{ nixosModule, fake-dashboard }:
{
  name = "nixfleet-agent";

  nodes.dashboard = { lib, pkgs, ... }: {
    environment.systemPackages = [ pkgs.curl ];
    networking.firewall.allowedTCPPorts = [ 8000 ];

    # Agent API on the test network (dashboard:8000); the control API stays on 127.0.0.1:8001
    # and is used from this node.
    systemd.services.fake-dashboard = {
      wantedBy = [ "multi-user.target" ];
      serviceConfig.ExecStart = "${lib.getExe fake-dashboard} --bind 0.0.0.0 --port 8000 --control-port 8001 --shared-token test-shared-token";
    };
  };

  nodes.agent = { lib, pkgs, ... }: {
    imports = [ nixosModule ];
    environment.systemPackages = [ pkgs.git ];

    services.nixfleet-agent = {
      enable = true;
      url = "http://dashboard:8000";
      allowInsecureHttp = true;
      tokenFile = "/run/nixfleet-token";
      configRepo = "/var/lib/nixcfg";
      interval = 2;
      watchdogSec = 10;
      prometheus.enable = true;
    };
    services.prometheus.exporters.node.enable = true;
    # Started by the test script, once the token file and the repository exist.
    systemd.services.nixfleet-agent.wantedBy = lib.mkForce [ ];
  };

  testScript = ''
    import json
    import time

    def wait_for(what, check, timeout=120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(1)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")

    start_all()
    dashboard.wait_for_unit("fake-dashboard.service")
    dashboard.wait_for_open_port(8000)

    agent.wait_for_unit("multi-user.target")
    agent.succeed(
        "(umask 077; echo test-shared-token > /run/nixfleet-token)",
        "git init -q --bare /srv/origin.git",
        "git clone -q /srv/origin.git /var/lib/nixcfg",
        "git -C /var/lib/nixcfg -c user.name=test -c user.email=test@example.com commit -q --allow-empty -m init",
        "git -C /var/lib/nixcfg push -q -u origin HEAD",
    )

    def restarts():
        return int(agent.succeed("systemctl show -P NRestarts nixfleet-agent.service").strip())

    def main_pid():
        return agent.succeed("systemctl show -P MainPID nixfleet-agent.service").strip()

    def active():
        return agent.execute("systemctl is-active nixfleet-agent.service")[0] == 0

    def requests():
        status, out = dashboard.execute("curl -sf http://127.0.0.1:8001/_fake/requests")
        return json.loads(out) if status == 0 else []

    with subtest("Type=notify: start returns after READY=1 and the unit is active"):
        agent.succeed("systemctl start nixfleet-agent.service")
        assert active()

    with subtest("no core dumps: LimitCORE=0"):
        limit = agent.succeed("systemctl show -P LimitCORE nixfleet-agent.service").strip()
        assert limit == "0", f"LimitCORE={limit}"

    with subtest("the agent registers as host 'agent'"):
        dashboard.wait_until_succeeds("curl -sf http://127.0.0.1:8001/_fake/hosts/agent", timeout=120)

    with subtest("a queued pull is run and reported"):
        dashboard.succeed(
            "curl -sf -X POST -H 'Content-Type: application/json'"
            + " -d '{\"command\":\"pull\",\"force\":true}'"
            + " http://127.0.0.1:8001/_fake/command/agent"
        )
        wait_for(
            "a /status report about the pull",
            lambda: any(
                "/api/hosts/agent/status" in r.get("path", "") and "Pull" in json.dumps(r.get("body"))
                for r in requests()
            ),
        )

    with subtest("kill -9: Restart=always starts it again"):
        before, pid = restarts(), main_pid()
        agent.succeed(f"kill -9 {pid}")
        wait_for("a restart", lambda: restarts() > before, timeout=60)
        wait_for("the unit to be active", active, timeout=60)
        assert main_pid() != pid

    with subtest("kill -STOP: no watchdog pings, so systemd kills and restarts it"):
        before, pid = restarts(), main_pid()
        agent.succeed(f"kill -STOP {pid}")
        # WatchdogSec=10, then SIGABRT, SIGKILL after TimeoutStopSec=45, RestartSec=5.
        wait_for("a restart", lambda: restarts() > before, timeout=180)
        journal = agent.succeed("journalctl -u nixfleet-agent.service")
        assert "Failed with result 'watchdog'" in journal, journal[-2000:]
        wait_for("the unit to be active", active, timeout=60)
        assert main_pid() != pid

    with subtest("prometheus.enable: the metrics directory is the exporter's textfile directory"):
        agent.wait_for_unit("prometheus-node-exporter.service")
        owner = agent.succeed("stat -c '%U %a' /run/nixfleet-agent-metrics").split()
        assert owner == ["root", "755"], owner
        cmdline = agent.succeed("cat /proc/$(systemctl show -P MainPID prometheus-node-exporter.service)/cmdline")
        assert "--collector.textfile.directory=/run/nixfleet-agent-metrics" in cmdline.split("\0"), cmdline
        setting = agent.succeed("cat /etc/nixfleet-agent/agent.toml")
        assert 'metrics_file = "/run/nixfleet-agent-metrics/nixfleet-agent.prom"' in setting, setting
  '';
}
