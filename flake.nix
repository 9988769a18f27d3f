{
  description = "nixfleet-agent: keeps NixOS and nix-darwin hosts under the control of a NixFleet dashboard";

  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";
    # Only for the darwin-module evaluation check; consumers can drop it with
    # `inputs.nixfleet.inputs.nix-darwin.follows = "";`.
    nix-darwin = {
      url = "github:nix-darwin/nix-darwin";
      inputs.nixpkgs.follows = "nixpkgs";
    };
  };

  outputs = { self, nixpkgs, nix-darwin }:
    let
      inherit (nixpkgs) lib;
      linuxSystems = [ "x86_64-linux" "aarch64-linux" ];
      darwinSystems = [ "x86_64-darwin" "aarch64-darwin" ];
      forAllSystems = f: lib.genAttrs (linuxSystems ++ darwinSystems) (system: f nixpkgs.legacyPackages.${system});

      # The modules take the package from pkgs when the overlay is applied, else from this flake
      # (built with this flake's pinned nixpkgs, which has a new enough Rust).
      withPackage = path: { lib, pkgs, ... }: {
        imports = [ path ];
        services.nixfleet-agent.package = lib.mkDefault (pkgs.nixfleet-agent or self.packages.${pkgs.stdenv.hostPlatform.system}.default);
      };

      # Evaluating one attribute of a configuration does not check its assertions; do it here.
      checked = eval: attr:
        let failed = lib.filter (a: !a.assertion) eval.config.assertions;
        in
        if failed == [ ] then attr eval.config
        else throw (lib.concatMapStringsSep "\n" (a: a.message) failed);

      # Smallest configurations that use the modules; their unit/plist are built by `checks`.
      exampleSettings = {
        enable = true;
        url = "https://fleet.example.com";
        tokenFile = "/run/secrets/nixfleet-token";
        repoUrl = "https://example.com/nixcfg.git";
        repoDir = "/var/lib/nixfleet-agent/repo";
      };
    in
    {
      overlays.default = final: _prev: {
        nixfleet-agent = final.callPackage ./nix/package.nix { };
      };

      nixosModules.default = withPackage ./nixos-module;
      darwinModules.default = withPackage ./darwin-module;

      packages = forAllSystems (pkgs: {
        default = pkgs.callPackage ./nix/package.nix { };
        fake-dashboard = pkgs.callPackage ./nix/package.nix { crate = "fake-dashboard"; };
      });

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          packages = with pkgs; [
            cargo
            rustc
            clippy
            rustfmt
            cargo-nextest
            git
            python3
            nixpkgs-fmt
            deadnix
          ];
        };
      });

      formatter = forAllSystems (pkgs: pkgs.nixpkgs-fmt);

      checks = forAllSystems (pkgs:
        let
          inherit (pkgs.stdenv.hostPlatform) system;
          agent = self.packages.${system}.default;
        in
        {
          package = agent;

          tests = agent.override { runTests = true; };

          clippy = agent.overrideAttrs (old: {
            pname = "nixfleet-agent-clippy";
            nativeBuildInputs = old.nativeBuildInputs ++ [ pkgs.clippy ];
            # Setting both phases keeps cargo's build and install hooks out.
            buildPhase = ''
              runHook preBuild
              cargo clippy --workspace --all-targets --offline -- -D warnings
              runHook postBuild
            '';
            installPhase = ''
              runHook preInstall
              touch "$out"
              runHook postInstall
            '';
            doCheck = false;
          });
        }
        // lib.optionalAttrs (lib.elem system linuxSystems) {
          vm-test = pkgs.testers.runNixOSTest (import ./nix/vm-test.nix {
            nixosModule = self.nixosModules.default;
            inherit (self.packages.${system}) fake-dashboard;
          });

          # The rendered unit file, including the build-time check-config of its TOML.
          nixos-module = checked
            (lib.nixosSystem {
              modules = [
                self.nixosModules.default
                {
                  services.nixfleet-agent = exampleSettings;
                  nixpkgs.hostPlatform = system;
                  boot.loader.grub.enable = false;
                  fileSystems."/".device = "/dev/null";
                  system.stateVersion = lib.trivial.release;
                }
              ];
            })
            (config: config.systemd.units."nixfleet-agent.service".unit);
        }
        // lib.optionalAttrs (lib.elem system darwinSystems) {
          # The rendered LaunchDaemon plist, including the build-time check-config.
          darwin-module = checked
            (nix-darwin.lib.darwinSystem {
              modules = [
                self.darwinModules.default
                {
                  services.nixfleet-agent = exampleSettings;
                  nixpkgs.hostPlatform = system;
                  system.stateVersion = 6;
                }
              ];
            })
            (config: config.environment.launchDaemons."org.nixfleet.agent.plist".source);
        });
    };
}
