# nix-darwin module: runs nixfleet-agent as the LaunchDaemon org.nixfleet.agent, with the same
# keys as plists/org.nixfleet.agent.plist (scripts/check-packaging compares them). Options are
# shared with the NixOS module (../nixos-module/options.nix); watchdogSec is systemd-only.
{ config, lib, pkgs, ... }:
let
  cfg = config.services.nixfleet-agent;
  render = import ../nixos-module/render.nix { inherit lib pkgs cfg; };

  label = "org.nixfleet.agent";
  stateDir = "/var/lib/nixfleet-agent";
  # Persistent on purpose: /var/run is emptied at boot and launchd creates no directories; the
  # lock is an flock, released by the kernel, so nothing stale can survive a crash.
  runtimeDir = "${stateDir}/run";
  logFile = "/var/log/nixfleet-agent.log";

  # The plist mentions only stable paths. If it named store paths, every new package or setting
  # would change it, and nix-darwin's activation would unload and reload the daemon in the
  # middle of the very switch the agent is running. /etc is updated before postActivation,
  # unlike /run/current-system, so a restart there already starts the new binary.
  agentPath = "/etc/nixfleet-agent/bin/nixfleet-agent";
  configPath = "/etc/nixfleet-agent/agent.toml";
  home = if cfg.user == "root" then "/var/root" else "/Users/${cfg.user}";
in
{
  imports = [ ../nixos-module/options.nix ];

  config = lib.mkIf cfg.enable {
    assertions = render.assertions;

    services.nixfleet-agent.settings = lib.mapAttrs (_: lib.mkDefault) render.fromOptions;

    # git for the agent (the /usr/bin/git stub may open an install dialog instead of running).
    environment.systemPackages = [ cfg.package pkgs.git ];
    environment.etc."nixfleet-agent/agent.toml".source = render.configFile;
    environment.etc."nixfleet-agent/bin/nixfleet-agent".source = lib.getExe' cfg.package "nixfleet-agent";

    # A non-root agent may run exactly darwin-rebuild as root, without a password (`sudo -n`).
    environment.etc."sudoers.d/nixfleet-agent" = lib.mkIf (cfg.user != "root") {
      text = ''
        ${cfg.user} ALL=(root) NOPASSWD: /run/current-system/sw/bin/darwin-rebuild
      '';
    };

    # Before the launchd phase, so a first start finds them. launchd has no StateDirectory=.
    system.activationScripts.extraActivation.text = ''
      # nixfleet-agent: state, runtime and log file, owned by the agent's user
      mkdir -p ${runtimeDir}
      chown ${cfg.user} ${stateDir} ${runtimeDir}
      chmod 0700 ${stateDir} ${runtimeDir}
      touch ${logFile}
      chown ${cfg.user} ${logFile}
    '';

    # Restart the agent when its binary or settings changed (store paths compared), since the
    # stable plist does not make nix-darwin reload it. A dashboard `switch` normally runs
    # detached from the agent (`nixfleet-agent switch-wrapper` in its own session): restarting
    # the agent then is safe, and the new instance reports the switch. Only when the switch runs
    # inside the agent (switch_isolation = "none") would a restart kill it; then the agent is
    # left alone, exits 10 by itself after reporting if its binary changed, and a settings-only
    # change applies at its next restart (dashboard `restart`).
    system.activationScripts.postActivation.text = ''
      nixfleet_stamp=${stateDir}/activated
      nixfleet_want='${lib.getExe' cfg.package "nixfleet-agent"} ${render.configFile}'
      if [ -f "$nixfleet_stamp" ] && [ "$(cat "$nixfleet_stamp")" != "$nixfleet_want" ]; then
        nixfleet_pid=$(/bin/launchctl print system/${label} 2>/dev/null \
          | /usr/bin/awk '$1 == "pid" && $2 == "=" { print $3; exit }' || true)
        nixfleet_inside=
        nixfleet_p=$$
        while [ -n "$nixfleet_pid" ] && [ -n "$nixfleet_p" ] && [ "$nixfleet_p" -gt 1 ]; do
          if [ "$nixfleet_p" = "$nixfleet_pid" ]; then nixfleet_inside=1; break; fi
          case "$(/bin/ps -o command= -p "$nixfleet_p" || true)" in
            *" switch-wrapper "*) break ;;
          esac
          nixfleet_p=$(/bin/ps -o ppid= -p "$nixfleet_p" | /usr/bin/tr -d ' ' || true)
        done
        if [ -n "$nixfleet_inside" ]; then
          echo "nixfleet-agent: changed; the agent running this switch restarts itself when done if its binary changed" >&2
        elif [ -n "$nixfleet_pid" ]; then
          echo "restarting nixfleet-agent" >&2
          /bin/launchctl kickstart -k system/${label} || true
        fi
      fi
      echo "$nixfleet_want" > "$nixfleet_stamp"
    '';

    launchd.daemons.nixfleet-agent = {
      # nix-darwin turns this into /bin/sh -c "/bin/wait4path /nix/store && exec ...".
      command = "${agentPath} run --config ${configPath}";
      environment = {
        NIXFLEET_STATE_DIR = stateDir;
        NIXFLEET_RUNTIME_DIR = runtimeDir;
        # What launchd will start next time: a switch that changes it makes the agent exit 10.
        NIXFLEET_AGENT_PATH = agentPath;
        HOME = home;
        PATH = "/run/current-system/sw/bin:/nix/var/nix/profiles/default/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin";
      }
      # Read by path at runtime; never copied to the store.
      // lib.optionalAttrs (cfg.tokenFile != null) { NIXFLEET_TOKEN_FILE = cfg.tokenFile; }
      // cfg.extraEnvironment;
      serviceConfig = {
        Label = label;
        UserName = lib.mkIf (cfg.user != "root") cfg.user;
        RunAtLoad = true;
        KeepAlive = true;
        ThrottleInterval = 10;
        ExitTimeOut = 45;
        # See plists/org.nixfleet.agent.plist: the one class launchd does not throttle.
        ProcessType = lib.mkDefault "Interactive";
        SoftResourceLimits.NumberOfFiles = lib.mkDefault 4096;
        Umask = 63; # 0077
        StandardOutPath = logFile;
        StandardErrorPath = logFile;
      };
    };
  };
}
