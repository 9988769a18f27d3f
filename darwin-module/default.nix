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
  # Programs the daemon needs that macOS lacks (the /usr/bin/git stub may open an install
  # dialog instead of running), through a stable path and without adding them to every user's
  # packages as environment.systemPackages would.
  toolsPath = "/etc/nixfleet-agent/tools";
  tools = pkgs.buildEnv { name = "nixfleet-agent-tools"; paths = [ pkgs.git ]; };
  # The user's real home: what users.users says when nix-darwin manages the user, else the
  # macOS default. root's is /var/root.
  home =
    if cfg.user == "root" then "/var/root"
    else if (config.users.users.${cfg.user}.home or null) != null then toString config.users.users.${cfg.user}.home
    else "/Users/${cfg.user}";
  # The CA bundle other nix-darwin daemons get (nix-daemon, cachix-agent): security.pki's
  # /etc/ssl/certs/ca-certificates.crt, a stable path. SSL_CERT_FILE is what the agent's own TLS
  # (rustls-native-certs) reads instead of the keychain; NIX_SSL_CERT_FILE is for nix and git.
  caBundle = config.environment.variables.NIX_SSL_CERT_FILE or null;
in
{
  imports = [ ../nixos-module/options.nix ];

  config = lib.mkIf cfg.enable {
    assertions = render.assertions;

    services.nixfleet-agent.settings = lib.mapAttrs (_: lib.mkDefault) render.fromOptions;

    # On PATH for operators (`nixfleet-agent check-config --config /etc/nixfleet-agent/agent.toml`).
    environment.systemPackages = [ cfg.package ];
    environment.etc."nixfleet-agent/agent.toml".source = render.configFile;
    environment.etc."nixfleet-agent/bin/nixfleet-agent".source = lib.getExe' cfg.package "nixfleet-agent";
    environment.etc."nixfleet-agent/tools".source = tools;

    # A non-root agent may run exactly darwin-rebuild as root, without a password (`sudo -n`).
    environment.etc."sudoers.d/nixfleet-agent" = lib.mkIf (cfg.user != "root") {
      text = ''
        ${cfg.user} ALL=(root) NOPASSWD: /run/current-system/sw/bin/darwin-rebuild
      '';
    };

    # launchd never rotates StandardOutPath. newsyslog renames the file when it passes 10 MiB;
    # launchd keeps the agent's descriptor, so the agent writes on into .0 until it restarts,
    # which is why the rule rotates by size only and never compresses (compressing .0 would
    # unlink the file the agent still writes). New files are 0600 and the agent user's.
    environment.etc."newsyslog.d/nixfleet-agent.conf".text = ''
      # logfilename          [owner:group]    mode count size(KiB) when  flags
      ${logFile}  ${cfg.user}:wheel  600  5  10240  *  N
    '';

    # launchd has no StateDirectory=: create what the daemon needs before it starts. The
    # directories are made early (extraActivation), but ownership is set after /etc is linked,
    # and so after nix-darwin created users and groups (the users phase runs after
    # extraActivation): on the first activation a new cfg.user does not exist any earlier.
    # Recursive (an earlier agent user's files, a clone in repoDir) and without following
    # symlinks (-h, and find does not descend into them). All before the launchd phase starts
    # the daemon.
    system.activationScripts.extraActivation.text = ''
      # nixfleet-agent: state and runtime directories, private log file
      # (BSD tools by absolute path: -h acts on a symlink itself, never on what it names.)
      /bin/mkdir -p ${runtimeDir}
      /bin/chmod -h 0700 ${stateDir} ${runtimeDir}
      /usr/bin/touch ${logFile}
      /bin/chmod -h 0600 ${logFile}
    '';
    system.activationScripts.etc.text = lib.mkAfter ''
      # nixfleet-agent: everything it keeps belongs to ${cfg.user}
      /usr/bin/find ${stateDir} ! -user ${cfg.user} -exec /usr/sbin/chown -h ${cfg.user} {} +
      /usr/sbin/chown -h ${cfg.user} ${logFile}
    '';

    # Restart the agent when its binary or settings changed (store paths compared), since the
    # stable plist does not make nix-darwin reload it. A dashboard `switch` normally runs
    # detached from the agent (`nixfleet-agent switch-wrapper` in its own session): restarting
    # the agent then is safe, and the new instance reports the switch. Only when the switch runs
    # inside the agent (switch_isolation = "none") would a restart kill it; then the agent is
    # left alone, exits 10 by itself after reporting if its binary changed, and a settings-only
    # change applies at its next restart (dashboard `restart`).
    system.activationScripts.postActivation.text = ''
      # Outside the state directory, which may belong to cfg.user: root writes this file.
      nixfleet_stamp=${stateDir}.activated
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
        PATH = "${toolsPath}/bin:/run/current-system/sw/bin:/nix/var/nix/profiles/default/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin";
      }
      // lib.optionalAttrs (caBundle != null) { SSL_CERT_FILE = caBundle; NIX_SSL_CERT_FILE = caBundle; }
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
        # No core dumps (systemd: LimitCORE=0): a core of the agent holds the token.
        SoftResourceLimits.Core = 0;
        HardResourceLimits.Core = 0;
        Umask = 63; # 0077
        StandardOutPath = logFile;
        StandardErrorPath = logFile;
      };
    };
  };
}
