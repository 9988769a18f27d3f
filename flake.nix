{
  description = "nixfleet-agent: keeps NixOS and nix-darwin hosts under the control of a NixFleet dashboard";

  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";
    # Only for the darwin-module and home-manager-module evaluation checks; consumers can drop
    # them with `inputs.nixfleet-agent.inputs.nix-darwin.follows = "";` (and home-manager).
    nix-darwin = {
      url = "github:nix-darwin/nix-darwin";
      inputs.nixpkgs.follows = "nixpkgs";
    };
    home-manager = {
      url = "github:nix-community/home-manager";
      inputs.nixpkgs.follows = "nixpkgs";
    };
  };

  outputs = { self, nixpkgs, nix-darwin, home-manager }:
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
      homeManagerModules.default = withPackage ./home-manager-module;

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
          # A check that builds every given file: the rendered unit or plist, and the config
          # file, which exists only once `nixfleet-agent check-config` accepted it.
          files = name: paths: pkgs.runCommand name { } ''
            mkdir "$out"
            ${lib.concatStrings (lib.mapAttrsToList (n: p: "ln -s ${p} \"$out/${n}\"\n") paths)}
          '';
          homeConfig = home:
            (home-manager.lib.homeManagerConfiguration {
              inherit pkgs;
              modules = [
                self.homeManagerModules.default
                {
                  services.nixfleet-agent = exampleSettings // { tokenFile = "${home}/.config/nixfleet/agent.token"; };
                  home.username = "alice";
                  home.homeDirectory = home;
                  home.stateVersion = "25.05";
                }
              ];
            });
        in
        {
          package = agent;

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
          # The test suite observes processes through /proc and util-linux, so it runs on
          # Linux; the macOS code is type-checked and linted by scripts/check-macos.
          tests = agent.override { runTests = true; };

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

          # The whole home-manager generation: the systemd user unit and the checked config.
          home-manager-module = checked (homeConfig "/home/alice") (config: config.home.activationPackage);
        }
        // lib.optionalAttrs (lib.elem system darwinSystems) {
          # The rendered LaunchDaemon plist and the config file, which the plist names by a
          # stable /etc path (no store path), so it is built here explicitly: that build runs
          # check-config.
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
            (config: files "darwin-module-check" {
              "org.nixfleet.agent.plist" = config.environment.launchDaemons."org.nixfleet.agent.plist".source;
              "agent.toml" = config.environment.etc."nixfleet-agent/agent.toml".source;
              "newsyslog.conf" = config.environment.etc."newsyslog.d/nixfleet-agent.conf".source;
            });

          # The whole home-manager generation: the LaunchAgent plist and the checked config.
          home-manager-module = checked (homeConfig "/Users/alice") (config: config.home.activationPackage);
        });
    };
}
