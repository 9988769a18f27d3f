# Evaluates the modules, the VM test and the flake outputs against a small stand-in for nixpkgs
# (no Nix store, no nixpkgs here), for scripts/check-packaging:
#   nix-instantiate --eval --strict --json scripts/check-packaging.d/eval.nix
# prints a JSON object: `failures` (a list of messages; empty is good), the VM test's
# `testScript`, and the rendered `nixosService` and `darwinDaemon` for comparison.
#
# The stand-in lib implements only what our files call, with nixpkgs' meaning: types check
# values (strMatching uses builtins.match, as nixpkgs does), mkIf/mkDefault/mkForce are
# simplified (no priorities: the option-to-settings merge is done by hand below). So this
# proves our own logic (defaults type-check, regexes, assertions, rendered settings, unit and
# plist values, flake output names), not nixpkgs' module system; `nix flake check` does that.
let
  inherit (builtins) all attrNames attrValues concatStringsSep elem filter isAttrs isBool isInt isString mapAttrs match stringLength substring;

  hasPrefix = p: s: substring 0 (stringLength p) s == p;
  containsRe = infix: s: match ".*${infix}.*" s != null;

  mkType = name: check: { _type = "type"; inherit name check; };
  types = {
    str = mkType "str" isString;
    bool = mkType "bool" isBool;
    package = mkType "package" (x: isAttrs x && x ? outPath);
    nullOr = t: mkType "null or ${t.name}" (x: x == null || t.check x);
    strMatching = re: mkType "string matching ${re}" (x: isString x && match re x != null);
    enum = vs: mkType "one of ${concatStringsSep ", " vs}" (x: elem x vs);
    attrsOf = t: mkType "attrs of ${t.name}" (x: isAttrs x && all t.check (attrValues x));
    submodule = _: mkType "submodule" isAttrs;
    ints = {
      positive = mkType "positive int" (x: isInt x && x > 0);
      unsigned = mkType "unsigned int" (x: isInt x && x >= 0);
      between = lo: hi: mkType "int in ${toString lo}..${toString hi}" (x: isInt x && x >= lo && x <= hi);
    };
  };

  lib = {
    inherit types hasPrefix all filter elem;
    mkOption = attrs: attrs // { _type = "option"; };
    mkEnableOption = name: { _type = "option"; type = types.bool; default = false; description = name; };
    mkPackageOption = pkgs: name: _: { _type = "option"; type = types.package; default = pkgs.${name}; };
    literalExpression = text: { _type = "literalExpression"; inherit text; };
    mkIf = cond: value: if cond then value else { };
    mkDefault = x: x;
    mkForce = x: x;
    inherit mapAttrs;
    optionalAttrs = c: a: if c then a else { };
    optional = c: x: if c then [ x ] else [ ];
    optionalString = c: s: if c then s else "";
    concatMapStringsSep = sep: f: l: concatStringsSep sep (map f l);
    genAttrs = names: f: builtins.listToAttrs (map (n: { name = n; value = f n; }) names);
    getExe' = pkg: exe: "${pkg}/bin/${exe}";
    getExe = pkg: "${pkg}/bin/${pkg.meta.mainProgram or pkg.pname}";
    importTOML = path: builtins.fromTOML (builtins.readFile path);
    fileset = {
      toSource = { root, fileset }: builtins.seq fileset root;
      unions = l: builtins.seq (builtins.length l) l;
      maybeMissing = p: p;
    };
    platforms.unix = [ "x86_64-linux" ];
    trivial.release = "26.05";
  };

  drv = name: { outPath = "/nix/store/00000000000000000000000000000000-${name}"; inherit name; };

  pkgs = {
    nixfleet-agent = drv "nixfleet-agent-0.1.0";
    git = drv "git";
    curl = drv "curl";
    jq = drv "jq";
    socat = drv "socat" // { meta.mainProgram = "socat"; };
    formats.toml = _: {
      type = types.attrsOf (mkType "TOML value" (_: true));
      generate = name: value: drv name // { inherit value; };
    };
    runCommand = name: env: script: drv name // { inherit env script; };
    stdenv.buildPlatform.canExecute = _: true;
    stdenv.hostPlatform.system = "x86_64-linux";
    callPackage = f: args: import f ({
      inherit lib;
      inherit (pkgs) git;
      rustPlatform.buildRustPackage = attrs: drv attrs.pname // attrs // {
        override = newArgs: pkgs.callPackage f (args // newArgs);
        overrideAttrs = g: attrs // g attrs;
      };
    } // args);
  };

  # Option declarations -> values: the given value or the default, type-checked.
  evalOptions = path: decl: given:
    if (decl._type or null) == "option" then
      let value = if given != null then given else decl.default or (throw "${path} has no default and is not set"); in
      if decl.type.check value then value
      else throw "${path} = ${builtins.toJSON value} is not a ${decl.type.name}"
    else mapAttrs (n: d: evalOptions "${path}.${n}" d (if given == null then null else given.${n} or null)) decl;

  options = (import ../../nixos-module/options.nix { inherit lib pkgs; }).options.services.nixfleet-agent;

  # The module system's result for services.nixfleet-agent: options, then settings = the typed
  # options' keys (mkDefault) under what the user put in settings.
  mkCfg = user:
    let
      cfg0 = evalOptions "services.nixfleet-agent" options (removeAttrs user [ "settings" ]);
      fromOptions = (import ../../nixos-module/render.nix { inherit lib pkgs; cfg = cfg0 // { settings = { }; }; }).fromOptions;
    in
    cfg0 // { settings = fromOptions // (user.settings or { }); };

  render = user: import ../../nixos-module/render.nix { inherit lib pkgs; cfg = mkCfg user; };
  failedAssertions = user: map (a: a.message) (filter (a: !a.assertion) (render user).assertions);

  nixosConfig = user: (import ../../nixos-module/default.nix {
    inherit lib pkgs;
    config = {
      services.nixfleet-agent = mkCfg user;
      users.users.alice = { };
      security.sudo.enable = true;
      nix.package = drv "nix";
      programs.ssh.package = drv "openssh";
    };
  }).config;

  darwinConfig = user: (import ../../darwin-module/default.nix {
    inherit lib pkgs;
    config.services.nixfleet-agent = mkCfg user;
  }).config;

  good = {
    enable = true;
    url = "https://fleet.example.com";
    tokenFile = "/run/secrets/nixfleet-token";
    repoUrl = "git@example.com:fleet/nixcfg.git";
    repoDir = "/var/lib/nixfleet-agent/repo";
  };

  vm = import ../../nix/vm-test.nix { nixosModule = null; fake-dashboard = drv "fake-dashboard" // { pname = "fake-dashboard"; }; };
  vmAgent = (vm.nodes.agent { inherit lib pkgs; }).services.nixfleet-agent;
  vmDashboard = vm.nodes.dashboard { inherit lib pkgs; };

  flake = import ../../flake.nix;
  flakeOutputs = flake.outputs {
    self = flakeOutputs;
    nixpkgs = {
      lib = lib // {
        nixosSystem = _: { config.assertions = [ ]; config.systemd.units."nixfleet-agent.service".unit = drv "unit"; };
      };
      legacyPackages = lib.genAttrs [ "x86_64-linux" "aarch64-linux" "x86_64-darwin" "aarch64-darwin" ] (system: pkgs // {
        stdenv = pkgs.stdenv // { hostPlatform.system = system; };
        testers.runNixOSTest = test: drv "vm-test-${test.name}";
        nixpkgs-fmt = drv "nixpkgs-fmt";
        mkShell = attrs: drv "shell" // attrs;
        clippy = drv "clippy";
        cargo = drv "cargo";
        rustc = drv "rustc";
        rustfmt = drv "rustfmt";
        cargo-nextest = drv "cargo-nextest";
        python3 = drv "python3";
        deadnix = drv "deadnix";
      });
    };
    nix-darwin.lib.darwinSystem = _: {
      config.assertions = [ ];
      config.environment.launchDaemons."org.nixfleet.agent.plist".source = drv "plist";
    };
  };

  storePaths = v:
    if isString v then containsRe "/nix/store/" v
    else if isAttrs v then (v ? outPath) || builtins.any storePaths (attrValues v)
    else if builtins.isList v then builtins.any storePaths v
    else false;

  expect = name: ok: if ok then [ ] else [ name ];

  nixos = nixosConfig good;
  unit = nixos.systemd.services.nixfleet-agent;
  darwin = darwinConfig good;
  daemon = darwin.launchd.daemons.nixfleet-agent;
  goodSettings = (mkCfg good).settings;

  failures =
    map (m: "assertion failed for a good configuration: ${m}") (failedAssertions good)
    ++ map (m: "assertion failed for the VM test's agent: ${m}") (failedAssertions vmAgent)
    ++ expect "a missing url is caught" (failedAssertions (removeAttrs good [ "url" ]) != [ ])
    ++ expect "url may come from settings instead" (failedAssertions (removeAttrs good [ "url" ] // { settings.url = "https://x.example"; }) == [ ])
    ++ expect "plain http without allowInsecureHttp is caught" (failedAssertions (good // { url = "http://fleet.example.com"; }) != [ ])
    ++ expect "plain http with allowInsecureHttp passes" (failedAssertions (good // { url = "http://fleet.example.com"; allowInsecureHttp = true; }) == [ ])
    ++ expect "repoUrl and configRepo together are caught" (failedAssertions (good // { configRepo = "/etc/nixos"; }) != [ ])
    ++ expect "neither repoUrl nor configRepo is caught" (failedAssertions (removeAttrs good [ "repoUrl" "repoDir" ]) != [ ])
    ++ expect "legacy configRepo alone passes" (failedAssertions (removeAttrs good [ "repoUrl" "repoDir" ] // { configRepo = "/etc/nixos"; }) == [ ])
    ++ expect "repoUrl without repoDir is caught" (failedAssertions (removeAttrs good [ "repoDir" ]) != [ ])
    ++ expect "a missing tokenFile is caught" (failedAssertions (removeAttrs good [ "tokenFile" ]) != [ ])
    ++ expect "a tokenFile in the store is caught" (failedAssertions (good // { tokenFile = "/nix/store/abc-token"; }) != [ ])
    ++ expect "a relative tokenFile is caught" (failedAssertions (good // { tokenFile = "token"; }) != [ ])
    ++ expect "NIXFLEET_TOKEN in extraEnvironment is caught" (failedAssertions (good // { extraEnvironment.NIXFLEET_TOKEN = "x"; }) != [ ])
    ++ expect "themeColor accepts #769ff0" (options.themeColor.type.check "#769ff0")
    ++ expect "themeColor rejects 769ff0" (!options.themeColor.type.check "769ff0")
    ++ expect "pinnedPubkey accepts a sha256 pin" (options.pinnedPubkey.type.check "sha256//YhKJKSzoTt2b5FP18fvpHo7fJYqQCjAa3HWY3tvRMwE=")
    ++ expect "pinnedPubkey accepts two pins" (options.pinnedPubkey.type.check "sha256//YhKJKSzoTt2b5FP18fvpHo7fJYqQCjAa3HWY3tvRMwE=;sha256//AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")
    ++ expect "pinnedPubkey accepts a key file" (options.pinnedPubkey.type.check "/etc/fleet.pub")
    ++ expect "pinnedPubkey rejects a short pin" (!options.pinnedPubkey.type.check "sha256//abc=")
    ++ expect "branch rejects an option-like name" (!options.branch.type.check "-x")
    ++ expect "branch accepts main" (options.branch.type.check "main")
    ++ expect "url rejects ftp" (!options.url.type.check "ftp://x")
    ++ expect "deviceType rejects others" (!options.deviceType.type.check "phone")
    ++ expect "interval rejects 0 and 3601" (!options.interval.type.check 0 && !options.interval.type.check 3601)
    ++ expect "settings keep typed defaults" (goodSettings.interval == 30 && goodSettings.branch == "main" && goodSettings.switch_mode == "auto" && goodSettings.allow_insecure_http == false)
    ++ expect "settings map options to the agent's keys" (goodSettings.url == good.url && goodSettings.repo_url == good.repoUrl && goodSettings.repo_dir == good.repoDir)
    ++ expect "unset options stay out of settings" (!(goodSettings ? location) && !(goodSettings ? git_timeout) && !(goodSettings ? nixcfg))
    ++ expect "timeouts map to *_timeout keys" ((mkCfg (good // { timeouts.gitLocal = 5; timeouts.killGrace = 0; })).settings.git_local_timeout == 5)
    ++ expect "killGrace 0 is kept" ((mkCfg (good // { timeouts.killGrace = 0; })).settings.kill_grace == 0)
    ++ expect "settings win over options" ((mkCfg (good // { settings.interval = 60; })).settings.interval == 60)
    ++ expect "the token is never a setting" (!(goodSettings ? token) && !(goodSettings ? token_file))
    ++ expect "NixOS: ExecStart runs the checked config" (containsRe "/bin/nixfleet-agent run --config /nix/store/[^ ]*-nixfleet-agent.toml" unit.serviceConfig.ExecStart)
    ++ expect "NixOS: check-config runs at build time" (containsRe "check-config --config" (render good).configFile.script)
    ++ expect "NixOS: the build-time check leaves host files out" (!((render (good // { caFile = "/etc/ca.pem"; })).configFile.env.checkInput.value ? ca_file))
    ++ expect "NixOS: checkConfig = false uses the rendered file" ((render (good // { checkConfig = false; })).configFile ? value)
    ++ expect "NixOS: LoadCredential passes tokenFile" (unit.serviceConfig.LoadCredential == [ "token:/run/secrets/nixfleet-token" ])
    ++ expect "NixOS: NIXFLEET_AGENT_PATH is the system profile's binary" (unit.environment.NIXFLEET_AGENT_PATH == "/run/current-system/sw/bin/nixfleet-agent")
    ++ expect "NixOS: extraEnvironment reaches the unit" ((nixosConfig (good // { extraEnvironment.RUST_BACKTRACE = "1"; })).systemd.services.nixfleet-agent.environment.RUST_BACKTRACE == "1")
    ++ expect "NixOS: /run/wrappers is first on PATH" (builtins.head unit.path == "/run/wrappers")
    ++ expect "NixOS: not restarted by switch-to-configuration" (!unit.restartIfChanged && !unit.unitConfig.X-StopOnRemoval)
    ++ expect "NixOS: root by default, no sudo rule" (unit.serviceConfig.User == "root" && nixos.security.sudo.extraRules == { })
    ++ expect "NixOS: a non-root user gets the nixos-rebuild sudo rule" ((builtins.head (nixosConfig (good // { user = "alice"; })).security.sudo.extraRules).users == [ "alice" ])
    ++ expect "NixOS: disabled means no config" (nixosConfig (good // { enable = false; }) == { })
    ++ expect "NixOS: /etc/nixfleet-agent/agent.toml for operators" (nixos.environment.etc."nixfleet-agent/agent.toml".source == (render good).configFile)
    ++ expect "darwin: command runs the stable binary and config" (daemon.command == "/etc/nixfleet-agent/bin/nixfleet-agent run --config /etc/nixfleet-agent/agent.toml")
    ++ expect "darwin: the plist names no store path" (!storePaths daemon)
    ++ expect "darwin: token by path" (daemon.environment.NIXFLEET_TOKEN_FILE == good.tokenFile)
    ++ expect "darwin: AGENT_PATH is what launchd starts" (hasPrefix daemon.environment.NIXFLEET_AGENT_PATH daemon.command)
    ++ expect "darwin: runs as root unless user is set" (daemon.serviceConfig.UserName == { } && (darwinConfig (good // { user = "alice"; })).launchd.daemons.nixfleet-agent.serviceConfig.UserName == "alice")
    ++ expect "darwin: the stable binary link points at the package" (darwin.environment.etc."nixfleet-agent/bin/nixfleet-agent".source == "${pkgs.nixfleet-agent}/bin/nixfleet-agent")
    ++ expect "darwin: postActivation compares store paths" (containsRe "${pkgs.nixfleet-agent}/bin/nixfleet-agent /nix/store/[^ ]*-nixfleet-agent.toml" darwin.system.activationScripts.postActivation.text)
    ++ expect "VM test: the dashboard serves the agent API on the test network, port 8000" (containsRe "--bind 0[.]0[.]0[.]0 --port 8000" vmDashboard.systemd.services.fake-dashboard.serviceConfig.ExecStart && !(vmDashboard.systemd.services ? fake-dashboard-forward))
    ++ expect "VM test: watchdogSec is short" (vmAgent.watchdogSec == 10)
    ++ expect "flake: outputs" (builtins.sort builtins.lessThan (attrNames flakeOutputs) == [ "checks" "darwinModules" "devShells" "formatter" "nixosModules" "overlays" "packages" ])
    ++ expect "flake: packages" (attrNames flakeOutputs.packages.x86_64-linux == [ "default" "fake-dashboard" ])
    ++ expect "flake: versions come from the crates" (flakeOutputs.packages.x86_64-linux.default.version == (lib.importTOML ../../Cargo.toml).package.version && flakeOutputs.packages.x86_64-linux.fake-dashboard.version == (lib.importTOML ../../crates/fake-dashboard/Cargo.toml).package.version)
    ++ expect "flake: only the agent is built" (flakeOutputs.packages.x86_64-linux.default.cargoBuildFlags == [ "-p" "nixfleet-agent" ])
    ++ expect "flake: linux checks" (attrNames flakeOutputs.checks.x86_64-linux == [ "clippy" "nixos-module" "package" "tests" "vm-test" ])
    ++ expect "flake: darwin checks" (attrNames flakeOutputs.checks.aarch64-darwin == [ "clippy" "darwin-module" "package" "tests" ])
    ++ expect "flake: tests run nextest" (flakeOutputs.checks.x86_64-linux.tests.doCheck && flakeOutputs.checks.x86_64-linux.tests.useNextest)
    ++ expect "flake: the package does not run tests" (!flakeOutputs.packages.x86_64-linux.default.doCheck)
    ++ expect "flake: clippy denies warnings" (containsRe "cargo clippy --workspace --all-targets --offline -- -D warnings" flakeOutputs.checks.x86_64-linux.clippy.buildPhase)
    ++ expect "flake: modules are functions" (builtins.isFunction flakeOutputs.nixosModules.default && builtins.isFunction flakeOutputs.darwinModules.default)
    ++ expect "flake: the overlay adds nixfleet-agent" ((flakeOutputs.overlays.default pkgs pkgs) ? nixfleet-agent);
in
{
  inherit failures;
  inherit (vm) testScript;
  # For scripts/check-packaging to compare with units/ and plists/.
  nixosService = unit;
  darwinDaemon = daemon;
}
