# Evaluates the modules, the VM test and the flake outputs against a small stand-in for nixpkgs
# (no Nix store, no nixpkgs here), for scripts/check-packaging:
#   nix-instantiate --eval --strict --json scripts/check-packaging.d/eval.nix
# prints a JSON object: `failures` (a list of messages; empty is good), the VM test's
# `testScript`, and the rendered service definitions (`nixosService`, `darwinDaemon`,
# `homeManagerUnit`, `homeManagerAgent`, `darwinNewsyslog`) that check-packaging compares with
# units/ and plists/.
#
# The stand-in lib implements only what our files call, with nixpkgs' meaning: types check
# values (strMatching uses builtins.match, as nixpkgs does), mkIf/mkDefault/mkForce are
# simplified (no priorities: the option-to-settings merge is done by hand below; mkMerge merges
# disjoint definitions; mkAfter keeps its text). So this
# proves our own logic (defaults type-check, regexes, assertions, rendered settings, unit and
# plist values, flake output names), not nixpkgs' module system; `nix flake check` does that.
let
  inherit (builtins) all attrNames attrValues concatStringsSep elem filter isAttrs isBool isInt isList isString mapAttrs match stringLength substring;

  hasPrefix = p: s: substring 0 (stringLength p) s == p;
  hasSuffix = p: s: stringLength s >= stringLength p && substring (stringLength s - stringLength p) (stringLength p) s == p;
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

  # mkMerge as the module system merges disjoint definitions (ours never define one leaf twice).
  merge = a: b:
    if isAttrs a && isAttrs b && !(a ? outPath) && !(b ? outPath)
    then a // mapAttrs (n: v: if a ? ${n} then merge a.${n} v else v) b
    else if isList a && isList b then a ++ b
    else b;

  lib = {
    inherit types hasPrefix all filter elem;
    inherit (builtins) head;
    mkMerge = builtins.foldl' merge { };
    mkAfter = x: x;
    # Our separators (" OR ", "://") hold no regex metacharacters.
    splitString = sep: s: filter isString (builtins.split sep s);
    escapeShellArg = s: "'${builtins.replaceStrings [ "'" ] [ "'\\''" ] s}'";
    mapAttrsToList = f: a: map (n: f n a.${n}) (attrNames a);
    concatStrings = concatStringsSep "";
    concatStringsSep = concatStringsSep;
    getLicenseFromSpdxId = id: { "MIT" = { spdxId = "MIT"; }; "Apache-2.0" = { spdxId = "Apache-2.0"; }; }.${id} or (throw "unknown SPDX license ${id}");
    hm.dag.entryBetween = before: after: data: { inherit data before after; };
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
    optionals = c: l: if c then l else [ ];
    optionalString = c: s: if c then s else "";
    concatMapStringsSep = sep: f: l: concatStringsSep sep (map f l);
    genAttrs = names: f: builtins.listToAttrs (map (n: { name = n; value = f n; }) names);
    getExe' = pkg: exe: "${pkg}/bin/${exe}";
    getExe = pkg: "${pkg}/bin/${pkg.meta.mainProgram or pkg.pname}";
    importTOML = path: builtins.fromTOML (builtins.readFile path);
    fileset = {
      toSource = { root, fileset }: { outPath = root; inherit fileset; };
      unions = l: builtins.seq (builtins.length l) l;
      maybeMissing = p: p;
    };
    licenses = { };
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
    python3 = drv "python3";
    perl = drv "perl";
    util-linux = drv "util-linux";
    buildEnv = { name, paths }: drv name // { inherit paths; };
    formats.toml = _: {
      type = types.attrsOf (mkType "TOML value" (_: true));
      generate = name: value: drv name // { inherit value; };
    };
    runCommand = name: env: script: drv name // { inherit env script; };
    stdenv.buildPlatform.canExecute = _: true;
    stdenv.hostPlatform = { system = "x86_64-linux"; isLinux = true; isDarwin = false; };
    callPackage = f: args: import f ({
      inherit lib;
      inherit (pkgs) git perl python3 util-linux stdenv;
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

  # The shared options, and the NixOS-only ones that nixos-module/default.nix declares itself.
  nixosModule = import ../../nixos-module/default.nix;
  options = merge
    (import ../../nixos-module/options.nix { inherit lib pkgs; }).options.services.nixfleet-agent
    (nixosModule { inherit lib pkgs; config = { }; }).options.services.nixfleet-agent;

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

  nixosConfig = user: (nixosModule {
    inherit lib pkgs;
    config = {
      services.nixfleet-agent = mkCfg user;
      services.prometheus.exporters.node = { enable = true; user = "node-exporter"; };
      users.users.alice = { };
      security.sudo.enable = true;
      nix.package = drv "nix";
      programs.ssh.package = drv "openssh";
    };
  }).config;

  darwinConfig = user: (import ../../darwin-module/default.nix {
    inherit lib pkgs;
    config = {
      services.nixfleet-agent = mkCfg user;
      users.users.bob.home = "/Users/bob-home";
      environment.variables.NIX_SSL_CERT_FILE = "/etc/ssl/certs/ca-certificates.crt";
    };
  }).config;

  hmConfig = isDarwin: user: (import ../../home-manager-module/default.nix {
    inherit lib;
    pkgs = pkgs // { stdenv = pkgs.stdenv // { hostPlatform = { inherit isDarwin; isLinux = !isDarwin; }; }; };
    config = {
      services.nixfleet-agent = mkCfg user;
      home = { homeDirectory = if isDarwin then "/Users/alice" else "/home/alice"; username = "alice"; };
      xdg.configHome = if isDarwin then "/Users/alice/.config" else "/home/alice/.config";
    };
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
        stdenv = pkgs.stdenv // { hostPlatform = { inherit system; isLinux = hasSuffix "-linux" system; isDarwin = hasSuffix "-darwin" system; }; };
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
      config.environment.etc."nixfleet-agent/agent.toml".source = drv "agent.toml";
      config.environment.etc."newsyslog.d/nixfleet-agent.conf".source = drv "newsyslog.conf";
    };
    home-manager.lib.homeManagerConfiguration = _: {
      config.assertions = [ ];
      config.home.activationPackage = drv "home-manager-generation";
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
  v2 = good // { url = "wss://fleet.example.com/ws"; };
  hmLinux = hmConfig false good;
  hmUnit = hmLinux.systemd.user.services.nixfleet-agent;
  hmDarwin = hmConfig true good;
  hmAgent = hmDarwin.launchd.agents.nixfleet-agent.config;
  package = flakeOutputs.packages.x86_64-linux.default;

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
    ++ expect "flake: outputs" (builtins.sort builtins.lessThan (attrNames flakeOutputs) == [ "checks" "darwinModules" "devShells" "formatter" "homeManagerModules" "nixosModules" "overlays" "packages" ])
    ++ expect "flake: packages" (attrNames flakeOutputs.packages.x86_64-linux == [ "default" "fake-dashboard" ])
    ++ expect "flake: versions come from the crates" (flakeOutputs.packages.x86_64-linux.default.version == (lib.importTOML ../../Cargo.toml).package.version && flakeOutputs.packages.x86_64-linux.fake-dashboard.version == (lib.importTOML ../../crates/fake-dashboard/Cargo.toml).package.version)
    ++ expect "flake: only the agent is built" (flakeOutputs.packages.x86_64-linux.default.cargoBuildFlags == [ "-p" "nixfleet-agent" ])
    ++ expect "flake: linux checks" (attrNames flakeOutputs.checks.x86_64-linux == [ "clippy" "home-manager-module" "nixos-module" "package" "tests" "vm-test" ])
    ++ expect "flake: darwin checks" (attrNames flakeOutputs.checks.aarch64-darwin == [ "clippy" "darwin-module" "home-manager-module" "package" ])
    ++ expect "flake: the darwin check builds the checked config, not only the plist" (containsRe "agent.toml" flakeOutputs.checks.aarch64-darwin.darwin-module.script && containsRe "-plist" flakeOutputs.checks.aarch64-darwin.darwin-module.script)
    ++ expect "flake: the home-manager checks build the generation" (flakeOutputs.checks.x86_64-linux.home-manager-module.name == "home-manager-generation" && flakeOutputs.checks.aarch64-darwin.home-manager-module.name == "home-manager-generation")
    ++ expect "flake: modules for NixOS, nix-darwin and home-manager" (builtins.isFunction flakeOutputs.homeManagerModules.default)
    ++ expect "flake: tests run nextest" (flakeOutputs.checks.x86_64-linux.tests.doCheck && flakeOutputs.checks.x86_64-linux.tests.useNextest)
    ++ expect "package: the tests' programs are check inputs on Linux" (map (p: p.name) flakeOutputs.checks.x86_64-linux.tests.nativeCheckInputs == [ "git" "perl" "python3" "util-linux" ])
    ++ expect "package: check-time tools are not runtime inputs" (!(package ? buildInputs) && !(package ? propagatedBuildInputs) && !(package ? nativeBuildInputs))
    ++ expect "package: nextest's config is in the source" (builtins.elem ../../.config/nextest.toml package.src.fileset)
    ++ expect "package: meta.license comes from Cargo.toml" (map (l: l.spdxId) package.meta.license == lib.splitString " OR " (lib.importTOML ../../Cargo.toml).package.license)
    ++ expect "package: Cargo.toml declares rust-version" ((lib.importTOML ../../Cargo.toml).package ? rust-version)
    ++ expect "flake: the package does not run tests" (!flakeOutputs.packages.x86_64-linux.default.doCheck)
    ++ expect "flake: clippy denies warnings" (containsRe "cargo clippy --workspace --all-targets --offline -- -D warnings" flakeOutputs.checks.x86_64-linux.clippy.buildPhase)
    ++ expect "flake: modules are functions" (builtins.isFunction flakeOutputs.nixosModules.default && builtins.isFunction flakeOutputs.darwinModules.default)
    ++ expect "flake: the overlay adds nixfleet-agent" ((flakeOutputs.overlays.default pkgs pkgs) ? nixfleet-agent)
    # Issue 12 item 4: assertions judge the final settings.
    ++ expect "a url given only in settings passes" (failedAssertions (removeAttrs good [ "url" ] // { settings.url = "https://fleet.example.com"; }) == [ ])
    ++ expect "a plain http url in settings without allow_insecure_http is caught" (failedAssertions (removeAttrs good [ "url" ] // { settings.url = "http://fleet.example.com"; }) != [ ])
    ++ expect "allow_insecure_http in settings is honoured" (failedAssertions (good // { url = "http://fleet.example.com"; settings.allow_insecure_http = true; }) == [ ])
    ++ expect "repo_url and repo_dir in settings pass" (failedAssertions (removeAttrs good [ "repoUrl" "repoDir" ] // { settings = { repo_url = "https://x.example/r.git"; repo_dir = "/var/lib/r"; }; }) == [ ])
    ++ expect "a relative repo_dir in settings is caught" (failedAssertions (good // { settings.repo_dir = "repo"; }) != [ ])
    ++ expect "a non-root user gets a warning about switch isolation" ((nixosConfig (good // { user = "alice"; })).warnings != [ ] && nixos.warnings == [ ])
    # Issue 9 item 1: v1 or v2 URL, and `protocol`.
    ++ expect "a v2 wss://.../ws url passes" (failedAssertions v2 == [ ])
    ++ expect "url type accepts wss and ws" (options.url.type.check "wss://fleet.example.com/ws" && options.url.type.check "ws://dashboard:8000/ws")
    ++ expect "a v2 url not ending in /ws is caught" (failedAssertions (good // { url = "wss://fleet.example.com"; }) != [ ] && failedAssertions (good // { url = "wss://fleet.example.com/ws/"; }) != [ ])
    ++ expect "ws:// needs allowInsecureHttp" (failedAssertions (good // { url = "ws://dashboard:8000/ws"; }) != [ ] && failedAssertions (good // { url = "ws://dashboard:8000/ws"; allowInsecureHttp = true; }) == [ ])
    ++ expect "protocol v2 with an https url must still name /ws" (failedAssertions (good // { protocol = "v2"; }) != [ ] && failedAssertions (good // { url = "https://fleet.example.com/ws"; protocol = "v2"; }) == [ ])
    ++ expect "protocol is rendered" (goodSettings.protocol == "auto" && (mkCfg (v2 // { protocol = "v2"; })).settings.protocol == "v2")
    ++ expect "protocol rejects v3" (!options.protocol.type.check "v3")
    # Issue 11 item 6: metrics into node-exporter's textfile collector.
    ++ expect "metricsFile maps to metrics_file" ((mkCfg (good // { metricsFile = "/run/m/a.prom"; })).settings.metrics_file == "/run/m/a.prom" && !(goodSettings ? metrics_file))
    ++ expect "prometheus.enable sets metricsFile, the exporter flag and the directory" (
      let c = nixosConfig (good // { prometheus.enable = true; }); in
      c.services.nixfleet-agent.metricsFile == "/run/nixfleet-agent-metrics/nixfleet-agent.prom"
      && c.services.prometheus.exporters.node.extraFlags == [ "--collector.textfile.directory=/run/nixfleet-agent-metrics" ]
      && c.systemd.tmpfiles.rules == [ "d /run/nixfleet-agent-metrics 0755 root root - -" ]
    )
    ++ expect "prometheus.enable off adds nothing" (nixos.services.prometheus.exporters.node.extraFlags == { } && nixos.systemd.tmpfiles.rules == { })
    # Issue 10 item 7: no core dumps.
    ++ expect "NixOS: LimitCORE=0" (unit.serviceConfig.LimitCORE == 0)
    ++ expect "darwin: Core 0, soft and hard" (daemon.serviceConfig.SoftResourceLimits.Core == 0 && daemon.serviceConfig.HardResourceLimits.Core == 0)
    # Issue 12 item 3: nix-darwin activation.
    ++ expect "darwin: ownership is set after users exist (etc phase), recursively, not following symlinks" (
      containsRe "find /var/lib/nixfleet-agent ! -user root -exec /usr/sbin/chown -h root" darwin.system.activationScripts.etc.text
      && !(containsRe "chown" darwin.system.activationScripts.extraActivation.text)
    )
    ++ expect "darwin: a non-root user owns state and log" (containsRe "chown -h bob /var/log/nixfleet-agent.log" (darwinConfig (good // { user = "bob"; })).system.activationScripts.etc.text)
    ++ expect "darwin: the log file is 0600" (containsRe "chmod -h 0600 /var/log/nixfleet-agent.log" darwin.system.activationScripts.extraActivation.text)
    ++ expect "darwin: HOME is the user's home from users.users" ((darwinConfig (good // { user = "bob"; })).launchd.daemons.nixfleet-agent.environment.HOME == "/Users/bob-home" && (darwinConfig (good // { user = "carol"; })).launchd.daemons.nixfleet-agent.environment.HOME == "/Users/carol" && daemon.environment.HOME == "/var/root")
    ++ expect "darwin: newsyslog rotates the log, 0600, owned by the agent's user, no compression" (builtins.match ".*/var/log/nixfleet-agent.log +root:wheel +600 +[0-9]+ +[0-9]+ +[*] +N\n.*" darwin.environment.etc."newsyslog.d/nixfleet-agent.conf".text != null)
    ++ expect "darwin: the CA bundle for the agent's TLS and for nix/git" (daemon.environment.SSL_CERT_FILE == "/etc/ssl/certs/ca-certificates.crt" && daemon.environment.NIX_SSL_CERT_FILE == "/etc/ssl/certs/ca-certificates.crt")
    ++ expect "darwin: git on the daemon's PATH, not in every user's packages" (hasPrefix "/etc/nixfleet-agent/tools/bin:" daemon.environment.PATH && darwin.environment.etc."nixfleet-agent/tools".source.paths == [ pkgs.git ] && !(builtins.elem pkgs.git darwin.environment.systemPackages))
    # Issue 12 item 6: home-manager.
    ++ expect "home-manager: switch mode home-manager" (hmLinux.services.nixfleet-agent.switchMode == "home-manager")
    ++ expect "home-manager: Linux user unit runs the stable binary with the checked config" (hmUnit.Service.ExecStart == "/home/alice/.config/nixfleet/bin/nixfleet-agent run --config /home/alice/.config/nixfleet/agent.toml" && hmLinux.xdg.configFile."nixfleet/agent.toml".source == (render good).configFile)
    ++ expect "home-manager: token by path" (builtins.elem "NIXFLEET_TOKEN_FILE=/run/secrets/nixfleet-token" hmUnit.Service.Environment)
    ++ expect "home-manager: the unit names no store path" (!storePaths hmUnit)
    ++ expect "home-manager: not restarted by its own activation" (hmUnit.Unit.X-SwitchMethod == "keep-old")
    ++ expect "home-manager: no LaunchAgent on Linux, no unit on macOS" (!(hmLinux ? launchd) && !(hmDarwin ? systemd))
    ++ expect "home-manager: macOS LaunchAgent" (hmAgent.Label == "org.nixfleet.agent.user" && hmAgent.ProgramArguments == [ "/Users/alice/.config/nixfleet/bin/nixfleet-agent" "run" "--config" "/Users/alice/.config/nixfleet/agent.toml" ] && hmAgent.EnvironmentVariables.NIXFLEET_TOKEN_FILE == good.tokenFile)
    ++ expect "home-manager: the LaunchAgent names no store path" (!storePaths hmAgent)
    ++ expect "home-manager: macOS directories made before the agents load" (hmDarwin.home.activation.nixfleetAgentDirectories.before == [ "setupLaunchAgents" ] && containsRe "mkdir -p '/Users/alice/.local/state/nixfleet-agent/run'" hmDarwin.home.activation.nixfleetAgentDirectories.data)
    ++ expect "home-manager: assertions like the other modules" (hmLinux.assertions == (render good).assertions)
    # Issue 12 item 5: the VM test never pipes into a reader that stops early.
    ++ expect "VM test: no pipe into grep (SIGPIPE under pipefail)" (builtins.match ".*[|] *grep.*" (builtins.replaceStrings [ "\n" ] [ " " ] vm.testScript) == null);
in
{
  inherit failures;
  inherit (vm) testScript;
  # For scripts/check-packaging to compare with units/ and plists/.
  nixosService = unit;
  darwinDaemon = daemon;
  homeManagerUnit = hmUnit;
  homeManagerAgent = hmAgent;
  darwinNewsyslog = darwin.environment.etc."newsyslog.d/nixfleet-agent.conf".text;
}
