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

  # The assertions judge the final settings, whether a value came from a typed option or was
  # written into `settings` directly (RFC 42: both are the same key).
  s = cfg.settings;
  url = toString (s.url or "");
  scheme = lib.head (lib.splitString "://" url);
  plain = lib.elem scheme [ "http" "ws" ];
  protocol =
    if (s.protocol or "auto") != "auto" then s.protocol
    else if lib.elem scheme [ "wss" "ws" ] then "v2"
    else "v1";
  # What the agent requires of a v2 URL: scheme://host[:port]/ws, nothing after /ws.
  v2UrlOk = builtins.match "[a-z]+://[^/?#@]+/ws" url != null;

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
      inherit (cfg) interval branch protocol;
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
    // optional "metrics_file" cfg.metricsFile
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
      assertion = s ? url;
      message = "services.nixfleet-agent.url must be set to the dashboard: \"https://fleet.example.com\" (v1) or \"wss://fleet.example.com/ws\" (v2).";
    }
    {
      assertion = url == "" || lib.elem scheme [ "https" "http" "wss" "ws" ];
      message = "services.nixfleet-agent.url = \"${url}\" must start with https:// (v1 dashboard) or wss:// (v2 dashboard).";
    }
    {
      assertion = plain -> (s.allow_insecure_http or false);
      message = "services.nixfleet-agent.url = \"${url}\" is plain ${scheme}, which sends the token in clear text: use https:// or wss://, or set services.nixfleet-agent.allowInsecureHttp = true for a test or a trusted link.";
    }
    {
      assertion = url == "" || protocol != "v2" || v2UrlOk;
      message = "services.nixfleet-agent.url = \"${url}\" is a v2 (WebSocket) dashboard URL, which must be exactly the dashboard's /ws endpoint, e.g. \"wss://fleet.example.com/ws\".";
    }
    {
      assertion = (s ? repo_url) != (s ? nixcfg);
      message = "services.nixfleet-agent: set exactly one of repoUrl (isolated mode: the agent clones the repository into repoDir) or configRepo (legacy mode: an existing checkout used in place, e.g. \"/etc/nixos\").";
    }
    {
      assertion = s ? repo_url -> s ? repo_dir;
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
      assertion = !(s ? ssh_key) || isHostPath (toString s.ssh_key);
      message = "services.nixfleet-agent.sshKeyFile (settings.ssh_key) must be an absolute path on the host, outside ${builtins.storeDir} (the store is world-readable).";
    }
    {
      assertion = lib.all (k: !(s ? ${k}) || lib.hasPrefix "/" (toString s.${k})) [ "repo_dir" "nixcfg" "ca_file" "metrics_file" ];
      message = "services.nixfleet-agent: repoDir, configRepo, caFile and metricsFile (settings repo_dir, nixcfg, ca_file, metrics_file) must be absolute paths.";
    }
    {
      assertion = !(cfg.extraEnvironment ? NIXFLEET_TOKEN) && !(s ? token);
      message = "services.nixfleet-agent: a token in extraEnvironment or settings would be copied into the world-readable Nix store; put it in a file and set services.nixfleet-agent.tokenFile.";
    }
  ];
}
