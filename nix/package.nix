# One binary of the Cargo workspace: nixfleet-agent (the default) or fake-dashboard (the VM
# test's dashboard). Tests are off here and run in the flake's `tests` check (runTests = true)
# so that installing the agent never depends on the test suite passing in a build sandbox.
{ lib
, rustPlatform
, git
, crate ? "nixfleet-agent"
, runTests ? false
}:
let
  manifest = if crate == "nixfleet-agent" then ../Cargo.toml else ../crates + "/${crate}/Cargo.toml";
in
rustPlatform.buildRustPackage {
  pname = crate;
  inherit ((lib.importTOML manifest).package) version;

  # Only what cargo reads: editing a .nix file or the README does not rebuild the agent.
  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../Cargo.toml
      ../Cargo.lock
      ../src
      ../crates
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
  # The integration tests drive real git repositories and a fake dashboard on 127.0.0.1.
  nativeCheckInputs = [ git ];
  preCheck = ''
    export HOME="$(mktemp -d)"
  '';
  __darwinAllowLocalNetworking = true;

  meta = {
    description =
      if crate == "nixfleet-agent"
      then "Agent that keeps NixOS and nix-darwin hosts under the control of a NixFleet dashboard"
      else "Fake NixFleet v1 dashboard for tests";
    mainProgram = crate;
    platforms = lib.platforms.unix;
  };
}
