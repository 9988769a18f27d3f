# NixOS module: runs nixfleet-agent as a systemd service. The unit carries the same directives as
# units/nixfleet-agent.service (scripts/check-packaging compares them); the reasons for each are
# written there and, for the NixOS-only parts, here.
{ config, lib, pkgs, ... }:
let
  cfg = config.services.nixfleet-agent;
  render = import ./render.nix { inherit lib pkgs cfg; };
  exporter = config.services.prometheus.exporters.node;
  # tmpfs: metrics from before a reboot never pass for current ones.
  metricsDir = "/run/nixfleet-agent-metrics";
in
{
  imports = [ ./options.nix ];

  # NixOS only, so declared here and not in ./options.nix.
  options.services.nixfleet-agent.prometheus.enable = lib.mkOption {
    type = lib.types.bool;
    default = false;
    description = ''
      Publish the agent's metrics through `services.prometheus.exporters.node` (which must be
      enabled): sets {option}`services.nixfleet-agent.metricsFile` to
      `${metricsDir}/nixfleet-agent.prom`, creates that directory with systemd-tmpfiles
      (mode 0755, owned by {option}`services.nixfleet-agent.user`, so the exporter's user can
      read it), and adds `--collector.textfile.directory=${metricsDir}` to the exporter's
      `extraFlags` (node_exporter 1.9 and later accept the flag more than once, so a textfile
      directory of your own keeps working). The textfile collector is on by default; do not
      list it in `disabledCollectors`.
    '';
  };

  config = lib.mkIf cfg.enable {
    assertions = render.assertions ++ [
      {
        assertion = cfg.user == "root" || config.users.users ? ${cfg.user};
        message = "services.nixfleet-agent.user = \"${cfg.user}\" is not a user of this system: declare users.users.${cfg.user}, or keep the default \"root\".";
      }
      {
        assertion = cfg.prometheus.enable -> exporter.enable;
        message = "services.nixfleet-agent.prometheus.enable publishes metrics through node-exporter's textfile collector: also set services.prometheus.exporters.node.enable = true, or turn it off.";
      }
      {
        assertion = cfg.user == "root" || config.security.sudo.enable;
        message = "services.nixfleet-agent.user = \"${cfg.user}\" needs sudo for nixos-rebuild: enable security.sudo, or keep the default user \"root\".";
      }
    ];

    warnings = lib.optional (cfg.user != "root") ''
      services.nixfleet-agent.user = "${cfg.user}": a non-root agent cannot start the transient
      systemd unit a switch normally runs in, so its switches run inside the agent's service and
      are cut short if the agent stops, restarts or crashes meanwhile. Keep the default user
      "root" for isolated switches.
    '';

    services.nixfleet-agent.settings = lib.mapAttrs (_: lib.mkDefault) render.fromOptions;

    services.nixfleet-agent.metricsFile = lib.mkIf cfg.prometheus.enable (lib.mkDefault "${metricsDir}/nixfleet-agent.prom");
    services.prometheus.exporters.node.extraFlags = lib.mkIf cfg.prometheus.enable [ "--collector.textfile.directory=${metricsDir}" ];
    # The agent replaces the file atomically (a temporary file in the same directory, then a
    # rename), so it needs the directory itself; the exporter only reads.
    systemd.tmpfiles.rules = lib.mkIf cfg.prometheus.enable [ "d ${metricsDir} 0755 ${cfg.user} root - -" ];

    # On PATH for operators (`nixfleet-agent check-config --config /etc/nixfleet-agent/agent.toml`),
    # and /run/current-system/sw/bin/nixfleet-agent is how the agent notices that a switch
    # installed a new version of itself (it then exits 10 and systemd starts the new one).
    environment.systemPackages = [ cfg.package ];
    environment.etc."nixfleet-agent/agent.toml".source = render.configFile;

    # A non-root agent may run exactly nixos-rebuild as root, without a password (`sudo -n`).
    # The path is the system profile's, not a store path: it is the same string in every
    # generation, so the rule still matches right after a switch, before the agent restarts.
    security.sudo.extraRules = lib.mkIf (cfg.user != "root") [
      {
        users = [ cfg.user ];
        runAs = "root";
        commands = [
          { command = "/run/current-system/sw/bin/nixos-rebuild"; options = [ "NOPASSWD" ]; }
        ];
      }
    ];

    systemd.services.nixfleet-agent = {
      description = "NixFleet agent (keeps this host under the NixFleet dashboard's control)";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      startLimitIntervalSec = 0;

      # The agent runs the switch that changes this unit: switch-to-configuration must not
      # restart it (that would cut the switch's report short), nor stop it when the module is
      # removed. Instead, after a switch that installed a new binary or changed this unit
      # (new settings), the agent reports, then exits 10, and systemd starts the new unit
      # (NIXFLEET_AGENT_PATH and NIXFLEET_RESTART_ON_CHANGE below).
      restartIfChanged = false;
      unitConfig.X-StopOnRemoval = false;

      # /run/wrappers/bin first (setuid sudo). nixos-rebuild comes from the system profile, so
      # the agent runs the same nixos-rebuild as an operator and the sudo rule above matches;
      # the profile also gives test scripts and `nixos-version` what a root shell has.
      path = [
        "/run/wrappers"
        config.nix.package
        pkgs.git
        config.programs.ssh.package
        "/run/current-system/sw"
      ];
      environment = {
        # What systemd starts next time, resolved: a switch that installs a new agent makes it
        # exit 10 after reporting, and systemd starts the new ExecStart.
        NIXFLEET_AGENT_PATH = "/run/current-system/sw/bin/nixfleet-agent";
        # A switch that changes this unit (any option above: settings, package, environment)
        # makes the agent report, then exit 10; systemd starts the new definition.
        NIXFLEET_RESTART_ON_CHANGE = "/etc/systemd/system/nixfleet-agent.service";
      } // cfg.extraEnvironment;

      serviceConfig = {
        Type = "notify";
        NotifyAccess = "main";
        ExecStart = "${lib.getExe' cfg.package "nixfleet-agent"} run --config ${render.configFile}";
        # systemd's verdict on every stop (watchdog, kill, crash) for the next start's restart
        # cause; "-": never fails the unit.
        ExecStopPost = "-${lib.getExe' cfg.package "nixfleet-agent"} record-exit --config ${render.configFile}";
        User = cfg.user;
        # Read by path as $CREDENTIALS_DIRECTORY/token: the file stays outside the store and
        # only this service (as cfg.user) can read the copy.
        LoadCredential = lib.optional (cfg.tokenFile != null) "token:${cfg.tokenFile}";

        WatchdogSec = cfg.watchdogSec;
        Restart = "always";
        RestartSec = 5;
        RestartPreventExitStatus = 78;
        RestartForceExitStatus = 10;
        TimeoutStopSec = 45;
        KillMode = "mixed";
        OOMPolicy = "continue";
        # No core dumps: a core of the agent holds the token.
        LimitCORE = 0;

        StateDirectory = "nixfleet-agent";
        StateDirectoryMode = "0700";
        RuntimeDirectory = "nixfleet-agent";
        RuntimeDirectoryMode = "0700";
        RuntimeDirectoryPreserve = "no";
        UMask = "0077";

        # The agent is root-equivalent by design; see units/nixfleet-agent.service for why
        # ProtectSystem, ProtectHome, NoNewPrivileges, PrivateTmp and the rest stay off.
        RestrictRealtime = true;
      };
    };
  };
}
