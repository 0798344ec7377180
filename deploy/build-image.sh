#!/usr/bin/env bash
# Build the avr-llm-proxy image from deploy/Containerfile, from the package index or offline from a wheelhouse.
#
#   deploy/build-image.sh                                   # podman (or docker), packages from the index
#   deploy/build-image.sh --wheelhouse ~/wheels             # offline: packages from ~/wheels only (made if empty)
#   deploy/build-image.sh --base localhost/debian-python:bookworm --wheelhouse ~/wheels --python /usr/bin/python3
#   ENGINE="podman --runtime runc" deploy/build-image.sh -- --ulimit nofile=4096:4096   # after --: build flags
#
# Options:
#   --tag TAG          image name (default localhost/avr-llm-proxy:latest)
#   --base IMAGE       BASE_IMAGE build argument (default: the Containerfile's, python:3.11-slim)
#   --wheelhouse DIR   install only from the wheels in DIR. When DIR has no wheels yet, they are built into it
#                      with `PY -m pip wheel` (this host needs the index once, the build never does). PY must
#                      be the image's Python version (see --python): markers such as python_full_version pick
#                      different packages otherwise.
#   --python PY        the interpreter that builds the wheelhouse (default python3)
# Environment: ENGINE, the container command with its global flags (default podman, else docker).
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
tag=localhost/avr-llm-proxy:latest
base=
wheelhouse=
python=python3
while [ $# -gt 0 ]; do
  case "$1" in
    --tag) tag="$2"; shift 2 ;;
    --base) base="$2"; shift 2 ;;
    --wheelhouse) wheelhouse="$2"; shift 2 ;;
    --python) python="$2"; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-image.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [ -z "${ENGINE:-}" ]; then
  if command -v podman >/dev/null; then ENGINE=podman; elif command -v docker >/dev/null; then ENGINE=docker; else
    echo "build-image.sh: neither podman nor docker found; set ENGINE" >&2; exit 2
  fi
fi
read -r -a engine <<< "$ENGINE"
build=("${engine[@]}" build -f deploy/Containerfile -t "$tag")
# podman writes OCI images by default, and OCI images have no HEALTHCHECK.
[[ "$(basename "${engine[0]}")" == podman* ]] && build+=(--format docker)
[ -n "$base" ] && build+=(--build-arg "BASE_IMAGE=$base")

if [ -z "$wheelhouse" ]; then
  cd "$repo"
  "${build[@]}" "$@" .
else
  mkdir -p "$wheelhouse"
  wheelhouse="$(cd "$wheelhouse" && pwd)"
  if ! compgen -G "$wheelhouse/*.whl" >/dev/null; then
    echo "build-image.sh: building the wheelhouse $wheelhouse with $("$python" --version 2>&1)" >&2
    requirements="$(mktemp)"
    "$python" - "$repo/pyproject.toml" > "$requirements" <<'EOF'
import sys
import tomllib

with open(sys.argv[1], "rb") as file:
    project = tomllib.load(file)
print("\n".join([*project["project"]["dependencies"], *project["build-system"]["requires"]]))
EOF
    partial="$wheelhouse.partial.$$"
    rm -rf "$partial"
    "$python" -m pip wheel --quiet --wheel-dir "$partial" -r "$requirements"
    rm -f "$requirements"
    mv "$partial"/*.whl "$wheelhouse"/ && rmdir "$partial"
  fi
  # A build context with only what the image needs, and the wheels under wheelhouse/.
  context="$(mktemp -d)"
  trap 'rm -rf "$context"' EXIT
  mkdir -p "$context/src" "$context/deploy"
  cp "$repo/pyproject.toml" "$repo/README.md" "$context/"
  cp "$repo/deploy/Containerfile" "$context/deploy/"
  cp -R "$repo/src/avr_llm_proxy" "$context/src/"
  find "$context/src" -name __pycache__ -prune -exec rm -rf {} +
  cp -R "$wheelhouse" "$context/wheelhouse"
  cd "$context"
  "${build[@]}" --build-arg WHEELHOUSE=wheelhouse "$@" .
fi
"${engine[@]}" image inspect --format '{{.Id}} {{.Size}}' "$tag" \
  | awk -v tag="$tag" '{ printf "build-image.sh: %s %s, %.1f MB\n", tag, substr($1, 1, 12), $2 / 1e6 }'
