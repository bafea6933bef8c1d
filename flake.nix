{
  description = "Dagma: a reproducible ML lab (nix develop, nix run .#services, nix flake check)";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";

  outputs =
    { self, nixpkgs }:
    let
      # The pins every front door shares; tests/static/test_front_doors.py compares them with
      # .python-version, .devcontainer/, compose.yaml and .github/workflows/ci.yml.
      pins = {
        python = "3.11";
        postgres = "16";
        qdrant = "1.19.1";
      };
      systems = [
        "x86_64-linux"
        "aarch64-linux"
        "x86_64-darwin"
        "aarch64-darwin"
      ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});

      tools =
        pkgs:
        let
          python = pkgs.python311;
          postgresql = pkgs.postgresql_16;
        in
        assert python.pythonVersion == pins.python;
        assert pkgs.lib.versions.major postgresql.version == pins.postgres;
        {
          inherit python postgresql;
          packages = [
            python
            pkgs.uv
            postgresql
            pkgs.qdrant
            pkgs.process-compose
            pkgs.git
            pkgs.gnumake
            pkgs.bash
            pkgs.coreutils
            pkgs.curl
            # llama-cpp-python ships only an sdist: uv builds it with these.
            pkgs.cmake
            pkgs.ninja
            pkgs.pkg-config
            pkgs.gcc
          ];
          # Wheels from PyPI (numpy, llama.cpp's build) link against these at run time.
          libraryPath = pkgs.lib.makeLibraryPath [
            pkgs.stdenv.cc.cc.lib
            pkgs.zlib
          ];
          uvEnv = ''
            export UV_PYTHON=${python}/bin/python${pins.python}
            export UV_PYTHON_DOWNLOADS=never
            export UV_COMPILE_BYTECODE=1
            export CMAKE_ARGS="''${CMAKE_ARGS:--DGGML_NATIVE=OFF}"
          '';
        };

      services =
        pkgs:
        let
          t = tools pkgs;
        in
        pkgs.writeShellScriptBin "dagma-services" ''
          set -euo pipefail
          export PATH=${pkgs.lib.makeBinPath t.packages}:$PATH
          export LD_LIBRARY_PATH=${t.libraryPath}''${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
          ${t.uvEnv}
          if [ ! -f pyproject.toml ] || [ ! -f deploy/process-compose.yaml ]; then
            echo "nix run .#services: run it from the root of the Dagma repository" >&2
            exit 1
          fi
          # Postgres from Nix, not whatever major the host has under /usr/lib/postgresql.
          export DAGMA_PG_BIN="''${DAGMA_PG_BIN:-${t.postgresql}/bin}"
          export DAGMA_QDRANT_PORT="''${DAGMA_QDRANT_PORT:-6333}"
          export DAGMA_QDRANT_GRPC_PORT="''${DAGMA_QDRANT_GRPC_PORT:-6334}"
          uv sync --frozen --quiet
          # Ports, state folder and role passwords exactly as `dagma services` reads them
          # (environment, then .env, then its defaults; passwords shared via secrets.json).
          eval "$(uv run --frozen --no-sync python -c '
          import shlex
          from dagma.services.config import get_config
          c = get_config()
          env = {
              "DAGMA_HOME": c.home,
              "DAGMA_PG_BIN": c.dagma_pg_bin,
              "DAGMA_PG_PORT": c.dagma_pg_port,
              "DAGMA_MLFLOW_PORT": c.dagma_mlflow_port,
              "DAGMA_DAGSTER_PORT": c.dagma_dagster_port,
              "DAGMA_GRPC_PORT": c.dagma_grpc_port,
              "DAGSTER_MAX_CONCURRENT_RUNS": c.dagster_max_concurrent_runs,
          }
          passwords = c.passwords()
          env["DAGMA_PG_DAGSTER_PASSWORD"] = passwords["dagster"]
          env["DAGMA_PG_MLFLOW_PASSWORD"] = passwords["mlflow"]
          for name, value in env.items():
              print(f"export {name}={shlex.quote(str(value))}")
          ')"
          mkdir -p "$DAGMA_HOME/dagster-services" "$DAGMA_HOME/qdrant-server" "$DAGMA_HOME/mlflow/artifacts"
          cp deploy/services/dagster.yaml "$DAGMA_HOME/dagster-services/dagster.yaml"
          if [ "$(id -u)" -eq 0 ]; then
            echo "nix run .#services: Postgres refuses to run as root; use an ordinary user" >&2
            exit 1
          fi
          exec process-compose -f deploy/process-compose.yaml --disable-dotenv up "$@"
        '';
    in
    {
      devShells = forAllSystems (
        pkgs:
        let
          t = tools pkgs;
        in
        {
          default = pkgs.mkShell {
            packages = t.packages;
            shellHook = ''
              ${t.uvEnv}
              export LD_LIBRARY_PATH=${t.libraryPath}''${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
              uv sync --frozen
              echo "Dagma dev shell: Python ${pins.python} from Nix, packages from uv.lock (.venv)."
              echo "  make demo | make test | nix run .#services | uv run dagma doctor"
            '';
          };
        }
      );

      packages = forAllSystems (pkgs: {
        services = services pkgs;
        default = services pkgs;
      });

      apps = forAllSystems (pkgs: {
        services = {
          type = "app";
          program = "${services pkgs}/bin/dagma-services";
        };
      });

      checks = forAllSystems (
        pkgs:
        let
          t = tools pkgs;
        in
        {
          devShell = self.devShells.${pkgs.stdenv.hostPlatform.system}.default;

          # nixpkgs builds qdrant from source at its own version: it must be the tag compose.yaml pins.
          pins = pkgs.runCommand "dagma-pins" { } ''
            if [ "${pkgs.qdrant.version}" != "${pins.qdrant}" ]; then
              echo "nixpkgs has qdrant ${pkgs.qdrant.version}, the repo pins ${pins.qdrant}:" >&2
              echo "move the nixpkgs input (nix flake lock --update-input nixpkgs) or the pins" >&2
              exit 1
            fi
            touch $out
          '';

          # The whole suite, as `make test` runs it. uv downloads the locked wheels, so this
          # check needs network: run it with `--option sandbox relaxed` (CI does).
          tests = pkgs.stdenvNoCC.mkDerivation {
            name = "dagma-tests";
            src = self;
            __noChroot = true;
            nativeBuildInputs = t.packages ++ [
              pkgs.cacert
              pkgs.nix
            ];
            dontConfigure = true;
            buildPhase = ''
              export HOME=$TMPDIR UV_CACHE_DIR=$TMPDIR/uv-cache
              export SSL_CERT_FILE=${pkgs.cacert}/etc/ssl/certs/ca-bundle.crt
              export LD_LIBRARY_PATH=${t.libraryPath}
              ${t.uvEnv}
              make test
            '';
            installPhase = "touch $out";
          };
        }
      );
    };
}
