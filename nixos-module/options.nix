# The options of services.nixfleet-agent, shared by the NixOS module (./default.nix), the
# nix-darwin module (../darwin-module/default.nix) and the home-manager module
# (../home-manager-module/default.nix). Options only: what the service looks like on each
# platform lives in those files, and how options become the agent's TOML config lives in
# ./render.nix.
#
# Every typed option that the agent reads is a default for one key of `settings` (RFC 42), so
# `settings` is the single source of the rendered config file and also the escape hatch for
# keys without an option. Secrets are never options with a value: only paths (tokenFile,
# sshKeyFile), which stay strings so that Nix never copies the file into the store.
{ lib, pkgs, ... }:
let
  inherit (lib) mkOption mkEnableOption types literalExpression;

  # A path on the target host, as a string: a path literal (./token) would be copied into the
  # world-readable store when interpolated, and types.str refuses one.
  hostPath = types.nullOr types.str;

  seconds = default: description: mkOption {
    type = types.nullOr types.ints.positive;
    default = null;
    example = default * 2;
    description = "${description} In seconds; `null` keeps the agent's default (${toString default}).";
  };
in
{
  options.services.nixfleet-agent = {
    enable = mkEnableOption "the NixFleet agent, which keeps this host under the control of a NixFleet dashboard";

    package = lib.mkPackageOption pkgs "nixfleet-agent" { };

    url = mkOption {
      type = types.nullOr (types.strMatching "(https?|wss?)://.+");
      default = null;
      example = "wss://fleet.example.com/ws";
      description = ''
        The dashboard (`url`). Its scheme picks the protocol (see {option}`protocol`):
        `https://fleet.example.com` is a v1 dashboard (HTTP polling, the base URL), and
        `wss://fleet.example.com/ws` a v2 dashboard (one WebSocket; the URL must end in `/ws`).
        Plain `http://` or `ws://` also needs {option}`allowInsecureHttp`.
      '';
    };

    protocol = mkOption {
      type = types.enum [ "auto" "v1" "v2" ];
      default = "auto";
      description = ''
        Which dashboard protocol to speak (`protocol`, `NIXFLEET_PROTOCOL`): `auto` follows the
        scheme of {option}`url` (`https`/`http`: v1, `wss`/`ws`: v2); `v1` or `v2` forces one
        and maps the scheme (`https` <-> `wss`).

        Settings by protocol: {option}`tokenFile`, {option}`caFile`, {option}`pinnedPubkey`,
        {option}`allowInsecureHttp`, {option}`interval` and the display fields apply to both.
        Only v1 knows per-host tokens: the token cache (`token_cache`, `NIXFLEET_TOKEN_CACHE`,
        default `<state dir>/token`) is used and written by v1 alone; v2 always presents the
        token from {option}`tokenFile` (the dashboard's shared agent token) and leaves the cache
        untouched. The `pull-reset` command exists only in v1.
      '';
    };

    tokenFile = mkOption {
      type = hostPath;
      default = null;
      example = "/run/secrets/nixfleet-token";
      description = ''
        Absolute path, on the host, of a file holding the dashboard token (the bare token or
        `NIXFLEET_TOKEN=<token>`): for v1 the shared or per-host token, for v2 the dashboard's
        `NIXFLEET_AGENT_TOKEN`. It is read at runtime and never copied to the Nix store: on
        NixOS through systemd `LoadCredential=`, elsewhere as `NIXFLEET_TOKEN_FILE`. Use a
        secrets manager path (sops-nix, agenix) or a file created by hand with mode 0600.
      '';
    };

    repoUrl = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "git@github.com:example/nixcfg.git";
      description = "Isolated mode (`repo_url`): the agent clones this repository into {option}`repoDir` and owns the clone (fetch + hard reset). Exclusive with {option}`configRepo`.";
    };

    repoDir = mkOption {
      type = hostPath;
      default = null;
      example = "/var/lib/nixfleet-agent/repo";
      description = "Isolated mode (`repo_dir`): where the agent keeps its clone of {option}`repoUrl`.";
    };

    branch = mkOption {
      type = types.strMatching "[^- \t][^ \t]*";
      default = "main";
      description = "Branch of {option}`repoUrl` that the agent follows (`branch`).";
    };

    sshKeyFile = mkOption {
      type = hostPath;
      default = null;
      example = "/etc/ssh/nixfleet_deploy_key";
      description = "Private SSH key for git over ssh (`ssh_key`); a host path, never copied to the store.";
    };

    configRepo = mkOption {
      type = hostPath;
      default = null;
      example = "/etc/nixos";
      description = "Legacy mode (`nixcfg`, v1 `NIXFLEET_NIXCFG`): an existing checkout that the agent uses in place (`git pull`). Exclusive with {option}`repoUrl`.";
    };

    interval = mkOption {
      type = types.ints.between 1 3600;
      default = 30;
      description = "Seconds between heartbeats (`interval`); the dashboard accepts 1 to 3600.";
    };

    location = mkOption {
      type = types.nullOr (types.strMatching ".{1,50}");
      default = null;
      example = "home";
      description = "Location shown on the dashboard (`location`, at most 50 characters); `null` derives it from the host name.";
    };

    deviceType = mkOption {
      type = types.nullOr (types.enum [ "server" "desktop" "laptop" "gaming" ]);
      default = null;
      description = "Device type shown on the dashboard (`device_type`); the dashboard rejects any other value. `null` derives it from the host name.";
    };

    themeColor = mkOption {
      type = types.nullOr (types.strMatching "#[0-9a-fA-F]{6}");
      default = null;
      example = "#769ff0";
      description = "Accent colour of the host on the dashboard (`theme_color`).";
    };

    timeouts = {
      git = seconds 120 "Limit for git commands that use the network (`git_timeout`).";
      gitLocal = seconds 30 "Limit for local git commands (`git_local_timeout`).";
      switch = seconds 600 "Limit for the switch (`switch_timeout`).";
      flake = seconds 300 "Limit for `nix flake update` (`flake_timeout`).";
      test = seconds 300 "Limit for each test script (`test_timeout`).";
      killGrace = mkOption {
        type = types.nullOr types.ints.unsigned;
        default = null;
        description = "Seconds between SIGTERM and SIGKILL for a timed-out command's process group (`kill_grace`); `null` keeps the agent's default (10).";
      };
    };

    stallTimeout = seconds 300 "The agent aborts itself (exit 70) when its main loop makes no progress for this long (`stall_timeout`).";

    watchdogSec = mkOption {
      type = types.ints.unsigned;
      default = 60;
      description = ''
        systemd `WatchdogSec=` (NixOS only). The agent pings at half this interval, and only
        while its main loop makes progress, so a wedged agent is killed and restarted.
        `0` disables the watchdog.
      '';
    };

    user = mkOption {
      type = types.str;
      default = "root";
      description = ''
        User the agent runs as. The switch needs root: a non-root user gets a passwordless sudo
        rule for `nixos-rebuild` / `darwin-rebuild` only. That user can still apply any
        configuration it can commit, so it is root-equivalent; the benefit is that the agent
        itself (network client, git) does not run as root.

        On NixOS a non-root agent loses switch isolation: only root may start the transient
        systemd unit a switch normally runs in, so the switch runs inside the agent's own service,
        and stopping or restarting the agent (or a crash) during a switch cuts the switch short.
        The module warns about this. On macOS the switch still runs in its own session.
      '';
    };

    allowInsecureHttp = mkOption {
      type = types.bool;
      default = false;
      description = "Allow an `http://` or `ws://` {option}`url` (`allow_insecure_http`), for v1 and v2 alike. The token then crosses the network in clear text; for tests and trusted links only.";
    };

    caFile = mkOption {
      type = hostPath;
      default = null;
      example = "/etc/ssl/certs/fleet-ca.pem";
      description = "PEM file of CA certificates trusted for the dashboard (`ca_file`), instead of the system roots; v1 and v2.";
    };

    pinnedPubkey = mkOption {
      type = types.nullOr (types.strMatching "(sha256//[A-Za-z0-9+/]{43}=(;sha256//[A-Za-z0-9+/]{43}=)*)|(/.+)");
      default = null;
      example = "sha256//YhKJKSzoTt2b5FP18fvpHo7fJYqQCjAa3HWY3tvRMwE=";
      description = "Public key pin(s) for the dashboard (`pinned_pubkey`): `sha256//<base64>` separated by `;`, or the path of a public key file, as curl's `--pinnedpubkey`; checked in addition to the chain, for v1 and v2.";
    };

    switchMode = mkOption {
      type = types.enum [ "auto" "nixos" "darwin" "home-manager" ];
      default = "auto";
      description = "How a switch is applied (`switch_mode`): `auto` picks nixos-rebuild on NixOS and darwin-rebuild on macOS.";
    };

    metricsFile = mkOption {
      type = hostPath;
      default = null;
      example = "/run/nixfleet-agent-metrics/nixfleet-agent.prom";
      description = ''
        Where the agent writes Prometheus text-format metrics (`metrics_file`,
        `NIXFLEET_METRICS_FILE`), replaced atomically, for node-exporter's textfile collector;
        `null` writes none. The file's directory must exist and be writable by
        {option}`user`. On NixOS, {option}`prometheus.enable` sets this and wires it to
        `services.prometheus.exporters.node`.
      '';
    };

    logLevel = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "info,nixfleet_agent=debug";
      description = "Log filter (`log`), in `tracing` EnvFilter syntax.";
    };

    settings = mkOption {
      type = types.submodule { freeformType = (pkgs.formats.toml { }).type; };
      default = { };
      example = literalExpression ''{ backoff_cap = 120; queue_limit = 4; }'';
      description = ''
        The agent's TOML configuration (RFC 42), passed with `--config`. The options above set
        defaults for their keys (`interval` -> `interval`, `timeouts.git` -> `git_timeout`, ...),
        so a key set here wins. Keys are the agent's setting names; an unknown key is a
        configuration error, caught at build time when {option}`checkConfig` is on. Never put a
        secret here: the file is in the world-readable Nix store.
      '';
    };

    extraEnvironment = mkOption {
      type = types.attrsOf types.str;
      default = { };
      example = { RUST_BACKTRACE = "1"; https_proxy = "http://proxy.example.com:3128"; };
      description = "Extra environment variables for the agent. Environment variables override {option}`settings` (the agent's precedence is flags > environment > file); never put the token here.";
    };

    checkConfig = mkOption {
      type = types.bool;
      default = pkgs.stdenv.buildPlatform.canExecute pkgs.stdenv.hostPlatform;
      defaultText = literalExpression "pkgs.stdenv.buildPlatform.canExecute pkgs.stdenv.hostPlatform";
      description = ''
        Validate the rendered configuration at build time with `nixfleet-agent check-config`,
        so a bad setting fails the build instead of the service (exit 78). Keys that name host
        files (`ca_file`, a `pinned_pubkey` file) cannot be checked in the build sandbox and are
        left out of that check.
      '';
    };
  };
}
