# How services.nixfleet-agent options become the agent's TOML config, shared by the NixOS and
# nix-darwin modules. A plain function, not a module:
#   render = import ./render.nix { inherit lib pkgs cfg; };
# gives the settings defaults (`fromOptions`), the config file to pass with `--config`
# (`configFile`, validated at build time when cfg.checkConfig), and the platform-independent
# assertions. It must not decide anything about systemd or launchd.
{ lib, pkgs, cfg }:
let
  toml = pkgs.formats.toml { };

  # Only options that are set: `null` means "the agent's default", which the agent knows best.
  optional = key: value: lib.optionalAttrs (value != null) { ${key} = value; };

  isHostPath = p: lib.hasPrefix "/" p && !lib.hasPrefix "${builtins.storeDir}/" p;

  # Keys whose value names a file on the target host: the build sandbox does not have it, and
  # the agent reads these files while validating, so they are left out of the build-time check.
  hostFileKeys =
    [ "ca_file" "token_file" ]
    ++ lib.optional (!(lib.hasPrefix "sha256//" (toString (cfg.settings.pinned_pubkey or "sha256//")))) "pinned_pubkey";

  rendered = toml.generate "nixfleet-agent.toml" cfg.settings;
in
{
  # Typed options -> settings keys (the agent's names). The modules apply these with mkDefault,
  # so a key set in `settings` wins.
  fromOptions =
    {
      inherit (cfg) interval branch;
      switch_mode = cfg.switchMode;
      allow_insecure_http = cfg.allowInsecureHttp;
    }
    // optional "url" cfg.url
    // optional "repo_url" cfg.repoUrl
    // optional "repo_dir" cfg.repoDir
    // optional "nixcfg" cfg.configRepo
    // optional "ssh_key" cfg.sshKeyFile
    // optional "location" cfg.location
    // optional "device_type" cfg.deviceType
    // optional "theme_color" cfg.themeColor
    // optional "ca_file" cfg.caFile
    // optional "pinned_pubkey" cfg.pinnedPubkey
    // optional "log" cfg.logLevel
    // optional "stall_timeout" cfg.stallTimeout
    // optional "git_timeout" cfg.timeouts.git
    // optional "git_local_timeout" cfg.timeouts.gitLocal
    // optional "switch_timeout" cfg.timeouts.switch
    // optional "flake_timeout" cfg.timeouts.flake
    // optional "test_timeout" cfg.timeouts.test
    // optional "kill_grace" cfg.timeouts.killGrace;

  # The file the service is started with. With checkConfig it is the same content, but only
  # after `nixfleet-agent check-config` accepted it, so a bad setting fails the build (and the
  # switch never starts) instead of the service exiting 78 on the host.
  configFile =
    if !cfg.checkConfig then rendered
    else
      pkgs.runCommand "nixfleet-agent.toml"
        {
          nativeBuildInputs = [ cfg.package ];
          checkInput = toml.generate "nixfleet-agent-check.toml" (removeAttrs cfg.settings hostFileKeys);
          preferLocalBuild = true;
        }
        ''
          # Only what the sandbox lacks; the environment would override the file (env > file).
          export NIXFLEET_STATE_DIR="$TMPDIR/state" NIXFLEET_RUNTIME_DIR="$TMPDIR/run"
          mkdir -p "$NIXFLEET_STATE_DIR" "$NIXFLEET_RUNTIME_DIR"
          ${lib.optionalString (!(cfg.settings ? hostname)) ''
            # The sandbox's host name is not this host's; the real one is checked at start.
            export NIXFLEET_HOSTNAME=nixfleet-check
          ''}
          nixfleet-agent check-config --config "$checkInput"
          cp ${rendered} "$out"
        '';

  assertions = [
    {
      assertion = cfg.settings ? url;
      message = "services.nixfleet-agent.url must be set to the dashboard's base URL, e.g. \"https://fleet.example.com\".";
    }
    {
      assertion = cfg.url != null && lib.hasPrefix "http://" cfg.url -> cfg.allowInsecureHttp;
      message = "services.nixfleet-agent.url is plain http, which sends the token in clear text: use https, or set services.nixfleet-agent.allowInsecureHttp = true for a test or a trusted link.";
    }
    {
      assertion = (cfg.settings ? repo_url) != (cfg.settings ? nixcfg);
      message = "services.nixfleet-agent: set exactly one of repoUrl (isolated mode: the agent clones the repository into repoDir) or configRepo (legacy mode: an existing checkout used in place, e.g. \"/etc/nixos\").";
    }
    {
      assertion = cfg.settings ? repo_url -> cfg.settings ? repo_dir;
      message = "services.nixfleet-agent.repoUrl needs services.nixfleet-agent.repoDir: the absolute path the agent clones into, e.g. \"/var/lib/nixfleet-agent/repo\".";
    }
    {
      assertion = cfg.tokenFile != null;
      message = "services.nixfleet-agent.tokenFile must be set to the path of a file holding the dashboard token (e.g. a sops-nix or agenix secret such as \"/run/secrets/nixfleet-token\"). The token itself never goes into the configuration.";
    }
    {
      assertion = cfg.tokenFile == null || isHostPath cfg.tokenFile;
      message = "services.nixfleet-agent.tokenFile must be an absolute path on the host, outside ${builtins.storeDir} (the store is world-readable), not \"${toString cfg.tokenFile}\".";
    }
    {
      assertion = cfg.sshKeyFile == null || isHostPath cfg.sshKeyFile;
      message = "services.nixfleet-agent.sshKeyFile must be an absolute path on the host, outside ${builtins.storeDir} (the store is world-readable).";
    }
    {
      assertion = lib.all (d: d == null || lib.hasPrefix "/" d) [ cfg.repoDir cfg.configRepo cfg.caFile ];
      message = "services.nixfleet-agent: repoDir, configRepo and caFile must be absolute paths.";
    }
    {
      assertion = !(cfg.extraEnvironment ? NIXFLEET_TOKEN) && !(cfg.settings ? token);
      message = "services.nixfleet-agent: a token in extraEnvironment or settings would be copied into the world-readable Nix store; put it in a file and set services.nixfleet-agent.tokenFile.";
    }
  ];
}
