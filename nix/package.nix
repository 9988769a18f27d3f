# One binary of the Cargo workspace: nixfleet-agent (the default) or fake-dashboard (the VM
# test's dashboard). Tests are off here and run in the flake's `tests` check (runTests = true)
# so that installing the agent never depends on the test suite passing in a build sandbox.
{ lib
, stdenv
, rustPlatform
, git
, perl
, python3
, util-linux
, crate ? "nixfleet-agent"
, runTests ? false
}:
let
  manifest = if crate == "nixfleet-agent" then ../Cargo.toml else ../crates + "/${crate}/Cargo.toml";
  package = (lib.importTOML manifest).package;
in
rustPlatform.buildRustPackage {
  pname = crate;
  inherit (package) version;

  # Only what cargo and nextest read: editing a .nix file or the README does not rebuild.
  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../Cargo.toml
      ../Cargo.lock
      ../src
      ../crates
      # nextest's profiles: the slow-timeout that turns a hung test into a failure.
      ../.config/nextest.toml
      (lib.fileset.maybeMissing ../tests)
      (lib.fileset.maybeMissing ../benches)
      (lib.fileset.maybeMissing ../examples)
      (lib.fileset.maybeMissing ../build.rs)
      (lib.fileset.maybeMissing ../clippy.toml)
    ];
  };
  cargoLock.lockFile = ../Cargo.lock;

  # The workspace has two members ("." and crates/fake-dashboard); build and install one.
  cargoBuildFlags = [ "-p" crate ];

  doCheck = runTests;
  useNextest = true;
  cargoTestFlags = [ "--workspace" ];
  # Every program the tests start that the build environment (stdenv: coreutils, bash, ...)
  # lacks: real git repositories, perl (a child that calls setsid() to escape its process
  # group), python3 (holds an flock like switch-to-configuration does), util-linux's flock (an
  # unrelated lock holder; that test is Linux-only). Check-time only: none of them is a
  # runtime input of the agent. scripts/check-packaging compares this list with what the
  # tests start, and `scripts/check-packaging --sandbox-path` runs the tests with only these.
  nativeCheckInputs = [ git perl python3 ] ++ lib.optionals stdenv.hostPlatform.isLinux [ util-linux ];
  preCheck = ''
    export HOME="$(mktemp -d)"
  '';
  __darwinAllowLocalNetworking = true;

  meta = {
    description =
      if crate == "nixfleet-agent"
      then "Agent that keeps NixOS and nix-darwin hosts under the control of a NixFleet dashboard"
      else "Fake NixFleet v1 dashboard for tests";
    # From Cargo.toml's SPDX expression, so the two cannot disagree.
    license = map lib.getLicenseFromSpdxId (lib.splitString " OR " (lib.importTOML ../Cargo.toml).package.license);
    mainProgram = crate;
    platforms = lib.platforms.unix;
  };
}
