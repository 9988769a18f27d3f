# home-manager module: nixfleet-agent for a home-manager-only host, as the user's own service:
# a systemd user unit on Linux (the directives of units/user/nixfleet-agent.service) and a
# LaunchAgent on macOS (the keys of plists/org.nixfleet.agent.user.plist);
# scripts/check-packaging compares them. Options are shared with the NixOS and nix-darwin
# modules (../nixos-module/options.nix). Here `user` is not used (the agent is this user) and
# switchMode defaults to home-manager.
{ config, lib, pkgs, ... }:
let
  cfg = config.services.nixfleet-agent;
  render = import ../nixos-module/render.nix { inherit lib pkgs cfg; };
  inherit (pkgs.stdenv.hostPlatform) isDarwin;
  home = config.home.homeDirectory;

  # The unit and the plist name only stable paths, links that a home-manager switch updates
  # (as the nix-darwin module does with /etc). With store paths, every new package or setting
  # would make home-manager's activation restart or reload the agent in the middle of the
  # switch the agent itself is running. The agent notices a new binary or config after its
  # switch (NIXFLEET_AGENT_PATH, NIXFLEET_RESTART_ON_CHANGE), reports, and exits 10 so that
  # its supervisor starts the new one.
  # ~/.config/nixfleet, not ~/.config/nixfleet-agent: systemd <= 253 puts a user unit's
  # StateDirectory= there (see units/user/nixfleet-agent.service).
  dir = "${config.xdg.configHome}/nixfleet";
  agentPath = "${dir}/bin/nixfleet-agent";
  configPath = "${dir}/agent.toml";
  toolsPath = "${dir}/tools";
  tools = pkgs.buildEnv { name = "nixfleet-agent-tools"; paths = [ pkgs.git ]; };
  unitPath = "${config.xdg.configHome}/systemd/user/nixfleet-agent.service";

  # macOS: launchd creates no directories and expands no variables.
  stateDir = "${home}/.local/state/nixfleet-agent";
  runtimeDir = "${stateDir}/run";
  logFile = "${home}/Library/Logs/nixfleet-agent.log";

  path = lib.concatStringsSep ":" ([
    "${toolsPath}/bin"
    "${home}/.nix-profile/bin"
    "${home}/.local/state/nix/profile/bin"
    "/etc/profiles/per-user/${config.home.username}/bin"
    "/nix/var/nix/profiles/default/bin"
  ] ++ (if isDarwin
  then [ "/run/current-system/sw/bin" "/usr/local/bin" "/usr/bin" "/bin" "/usr/sbin" "/sbin" ]
  else [ "/run/wrappers/bin" "/run/current-system/sw/bin" "/usr/local/bin" "/usr/bin" "/bin" ]));

  # One systemd `Environment=` assignment: quoted when it holds a space, quote or backslash,
  # and `%` doubled (systemd expands specifiers there).
  envLine = n: v:
    let line = builtins.replaceStrings [ "%" ] [ "%%" ] "${n}=${v}"; in
    if builtins.match ".*[ \t\"\\].*" line == null then line
    else ''"${builtins.replaceStrings [ "\\" "\"" ] [ "\\\\" "\\\"" ] line}"'';

  environment = {
    NIXFLEET_AGENT_PATH = agentPath;
    PATH = path;
  }
  # Read by path at runtime; never copied to the store.
  // lib.optionalAttrs (cfg.tokenFile != null) { NIXFLEET_TOKEN_FILE = cfg.tokenFile; }
  // cfg.extraEnvironment;
in
{
  imports = [ ../nixos-module/options.nix ];

  config = lib.mkIf cfg.enable (lib.mkMerge [
    {
      assertions = render.assertions;

      # `auto` would pick nixos-rebuild or darwin-rebuild; this host is managed by home-manager.
      services.nixfleet-agent.switchMode = lib.mkDefault "home-manager";
      services.nixfleet-agent.settings = lib.mapAttrs (_: lib.mkDefault) render.fromOptions;

      # On PATH for the user (`nixfleet-agent check-config --config ~/.config/nixfleet/agent.toml`).
      home.packages = [ cfg.package ];
      xdg.configFile."nixfleet/agent.toml".source = render.configFile;
      xdg.configFile."nixfleet/bin/nixfleet-agent".source = lib.getExe' cfg.package "nixfleet-agent";
      xdg.configFile."nixfleet/tools".source = tools;
    }

    (lib.mkIf (!isDarwin) {
      systemd.user.services.nixfleet-agent = {
        Unit = {
          Description = "NixFleet agent (home-manager; keeps this user's configuration under the dashboard)";
          StartLimitIntervalSec = 0;
          # A changed unit is not restarted by home-manager's activation (which may be the
          # agent's own switch); the agent restarts itself after its switch
          # (NIXFLEET_RESTART_ON_CHANGE), or on the next `systemctl --user restart`.
          X-SwitchMethod = "keep-old";
        };
        Service = {
          Type = "notify";
          NotifyAccess = "main";
          ExecStart = "${agentPath} run --config ${configPath}";
          # Keeps systemd's verdict on the last exit (watchdog, kill, crash) for the next
          # start's "Agent started (...): <cause>".
          ExecStopPost = "-${agentPath} record-exit --config ${configPath}";
          Environment = lib.mapAttrsToList envLine (environment // {
            NIXFLEET_RESTART_ON_CHANGE = "${unitPath}:${configPath}";
          });
          WatchdogSec = cfg.watchdogSec;
          Restart = "always";
          RestartSec = 5;
          RestartPreventExitStatus = 78;
          RestartForceExitStatus = 10;
          TimeoutStopSec = 45;
          KillMode = "mixed";
          OOMPolicy = "continue";
          LimitCORE = 0;
          StateDirectory = "nixfleet-agent";
          StateDirectoryMode = "0700";
          RuntimeDirectory = "nixfleet-agent";
          RuntimeDirectoryMode = "0700";
          RuntimeDirectoryPreserve = "no";
          UMask = "0077";
        };
        Install.WantedBy = [ "default.target" ];
      };
    })

    (lib.mkIf isDarwin {
      # Before home-manager (re)loads its LaunchAgents.
      home.activation.nixfleetAgentDirectories = lib.hm.dag.entryBetween [ "setupLaunchAgents" ] [ "writeBoundary" ] ''
        run /bin/mkdir -p ${lib.escapeShellArg runtimeDir} ${lib.escapeShellArg (builtins.dirOf logFile)}
        run /bin/chmod 0700 ${lib.escapeShellArg stateDir} ${lib.escapeShellArg runtimeDir}
        run /usr/bin/touch ${lib.escapeShellArg logFile}
        run /bin/chmod 0600 ${lib.escapeShellArg logFile}
      '';

      launchd.agents.nixfleet-agent = {
        enable = true;
        config = {
          Label = "org.nixfleet.agent.user";
          # home-manager wraps this in /bin/sh -c "/bin/wait4path /nix/store && exec ...".
          ProgramArguments = [ agentPath "run" "--config" configPath ];
          EnvironmentVariables = environment // {
            NIXFLEET_STATE_DIR = stateDir;
            NIXFLEET_RUNTIME_DIR = runtimeDir;
            NIXFLEET_RESTART_ON_CHANGE = configPath;
          };
          RunAtLoad = true;
          KeepAlive = true;
          ThrottleInterval = 10;
          ExitTimeOut = 45;
          ProcessType = "Interactive";
          SoftResourceLimits = { NumberOfFiles = 4096; Core = 0; };
          HardResourceLimits.Core = 0;
          Umask = 63; # 0077
          StandardOutPath = logFile;
          StandardErrorPath = logFile;
        };
      };
    })
  ]);
}
