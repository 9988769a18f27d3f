# NixOS VM test for pkgs.testers.runNixOSTest: the NixOS module against the workspace's fake
# dashboard. Proves Type=notify start, registration, a command round trip, and both restart
# paths (a killed agent, and a frozen one caught by the watchdog).
{ nixosModule, fake-dashboard }:
{
  name = "nixfleet-agent";

  nodes.dashboard = { lib, pkgs, ... }: {
    environment.systemPackages = [ pkgs.curl pkgs.jq ];
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
    };
    # Started by the test script, once the token file and the repository exist.
    systemd.services.nixfleet-agent.wantedBy = lib.mkForce [ ];
  };

  testScript = ''
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

    with subtest("Type=notify: start returns after READY=1 and the unit is active"):
        agent.succeed("systemctl start nixfleet-agent.service")
        agent.succeed("systemctl is-active nixfleet-agent.service")

    with subtest("the agent registers as host 'agent'"):
        dashboard.wait_until_succeeds("curl -sf http://127.0.0.1:8001/_fake/hosts/agent", timeout=120)

    with subtest("a queued pull is run and reported"):
        dashboard.succeed(
            "curl -sf -X POST -H 'Content-Type: application/json'"
            + " -d '{\"command\":\"pull\",\"force\":true}'"
            + " http://127.0.0.1:8001/_fake/command/agent"
        )
        dashboard.wait_until_succeeds(
            "curl -sf http://127.0.0.1:8001/_fake/requests"
            + " | jq -e 'any(.[]; (.path | test(\"/api/hosts/agent/status\"))"
            + " and (.body | tostring | test(\"Pull\")))'",
            timeout=120,
        )

    with subtest("kill -9: Restart=always starts it again"):
        before, pid = restarts(), main_pid()
        agent.succeed(f"kill -9 {pid}")
        agent.wait_until_succeeds(f"test $(systemctl show -P NRestarts nixfleet-agent.service) -gt {before}", timeout=60)
        agent.wait_until_succeeds("systemctl is-active nixfleet-agent.service", timeout=60)
        assert main_pid() != pid

    with subtest("kill -STOP: no watchdog pings, so systemd kills and restarts it"):
        before, pid = restarts(), main_pid()
        agent.succeed(f"kill -STOP {pid}")
        # WatchdogSec=10, then SIGABRT, SIGKILL after TimeoutStopSec=45, RestartSec=5.
        agent.wait_until_succeeds(f"test $(systemctl show -P NRestarts nixfleet-agent.service) -gt {before}", timeout=180)
        agent.succeed("journalctl -u nixfleet-agent.service | grep -q \"Failed with result 'watchdog'\"")
        agent.wait_until_succeeds("systemctl is-active nixfleet-agent.service", timeout=60)
        assert main_pid() != pid
  '';
}
