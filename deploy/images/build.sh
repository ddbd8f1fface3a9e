#!/usr/bin/env bash
# Builds the three OCI images of fedcare with podman (no container registry needed):
#
#   fedcare-coordinator  SuperLink and its network edge (nginx)      fedcare coordinator start
#   fedcare-node         SuperNode and its ClientApp worker          fedcare node start
#   fedcare-serve        the on-site inference service (no torch)    fedcare serve
#
# each tagged with the project version (pyproject.toml) and `latest`. Steps, each cached in
# $FEDCARE_IMAGES_BUILD (default ~/.cache/fedcare/images: outside the repository, because tests copy
# the repository's tree, e.g. tests/test_deployment.py's changed App):
#
#   1. the Debian bookworm root filesystems, with mmdebstrap (variant essential: no apt, no dpkg
#      front end, only the listed packages and their dependencies, security updates included):
#      cache/os-<key>.tar (python3, ca-certificates, libstdc++6) and cache/os-edge-<key>.tar
#      (the same and nginx), `podman import`ed as localhost/fedcare-os:<key> and
#      localhost/fedcare-os-edge:<key>; <key> hashes the package list and options, so a tarball is
#      made once per machine (FEDCARE_IMAGES_REFRESH_OS=1 makes new ones, e.g. for security updates);
#   2. the wheelhouse: `pip wheel -c requirements.lock -c deploy/images/constraints.txt` on the host
#      (whose pip finds the CPU torch wheel), so the images install with `--no-index` only: every
#      version is the lock file's (pip and setuptools: constraints.txt's);
#   3. the build context: the Flower App tree (only what the app needs), the requirement sets, the
#      health check;
#   4. `podman build --isolation chroot --format docker` of each target of deploy/images/Containerfile
#      (docker format: OCI image configs have no HEALTHCHECK).
#
# Usage: deploy/images/build.sh [coordinator|node|serve ...]   (default: all three)
# Environment: PYTHON (the interpreter whose pip builds the wheelhouse; default .venv/bin/python),
#              FEDCARE_IMAGES_BUILD (default ~/.cache/fedcare/images), DEBIAN_MIRROR, FEDCARE_IMAGES_REFRESH_OS=1.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
OUT="${FEDCARE_IMAGES_BUILD:-${XDG_CACHE_HOME:-$HOME/.cache}/fedcare/images}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SECURITY_MIRROR="${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
ROLES=("$@")
[ ${#ROLES[@]} -gt 0 ] || ROLES=(coordinator node serve)

# Debian packages of the root filesystems (their dependencies come along; nothing else does).
# libstdc++6: the manylinux wheels (numpy, torch, onnxruntime, grpcio, ...) need it. No python3-venv: the venv is
# made --without-pip and filled by the wheelhouse's pip run from its wheel, so no pip is left in any layer.
OS_PACKAGES="python3,ca-certificates,libstdc++6"
EDGE_PACKAGES="$OS_PACKAGES,nginx"

# What each image installs from pyproject.toml's [project] dependencies, at requirements.lock's versions:
# - coordinator and node: all of them, except what only `fedcare simulate` / `fedcare example` use
#   (Ray, via flwr's `simulation` extra, and scikit-learn): deployment never imports them;
# - serve: what `fedcare serve` (and `serve token`, `serve cert`, `verify`) imports: no torch, Opacus,
#   Flower or ONNX (tests/test_serve.py checks that this path loads none of them).
FULL_DROP="scikit-learn"
SERVE_KEEP="cryptography numpy onnxruntime orjson fastapi uvicorn httptools uvloop"
# pip and setuptools, which requirements.lock (pip freeze) leaves out, are pinned in deploy/images/constraints.txt.

log() { printf 'images: %s\n' "$*" >&2; }

need_tools() {
    local missing=()
    command -v podman >/dev/null 2>&1 || missing+=(podman)
    command -v mmdebstrap >/dev/null 2>&1 || missing+=(mmdebstrap)
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing ${missing[*]} (Debian packages)"
    local sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

project_field() {  # version | name
    python3 -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"][sys.argv[2]])' \
        "$ROOT/pyproject.toml" "$1"
}

# -- 1. the Debian root filesystems --------------------------------------------------------------

rootfs() {  # NAME PACKAGES -> prints the image reference
    local name="$1" packages="$2" key tarball image fresh=0
    local -a opts=(
        --variant=essential
        --include="$packages"
        --dpkgopt='path-exclude=/usr/share/man/*'
        --dpkgopt='path-exclude=/usr/share/info/*'
        --dpkgopt='path-exclude=/usr/share/locale/*'
        --dpkgopt='path-exclude=/usr/share/doc/*'
        --dpkgopt='path-include=/usr/share/doc/*/copyright'
        --dpkgopt='path-exclude=/usr/share/lintian/*'
    )
    key="$(printf '%s\n' bookworm "$MIRROR" "$SECURITY_MIRROR" "${opts[@]}" | sha256sum | cut -c1-12)"
    tarball="$OUT/cache/$name-$key.tar"
    image="localhost/$name:$key"
    if [ ! -s "$tarball" ]; then
        log "mmdebstrap $name ($packages) -> $tarball"
        mkdir -p "$OUT/cache/debs"
        # the .debs are kept in cache/debs, so the second root filesystem downloads only what it adds
        mmdebstrap "${opts[@]}" \
            --skip=essential/unlink \
            --setup-hook='mkdir -p "$1"/var/cache/apt/archives/' \
            --setup-hook="sync-in '$OUT/cache/debs' /var/cache/apt/archives/" \
            --customize-hook="sync-out /var/cache/apt/archives '$OUT/cache/debs'" \
            --customize-hook='rm -f "$1"/var/cache/apt/archives/*.deb' \
            --format=tar bookworm "$tarball.part" \
            "deb $MIRROR bookworm main" \
            "deb $MIRROR bookworm-updates main" \
            "deb $SECURITY_MIRROR bookworm-security main" >"$OUT/cache/$name.log" 2>&1 \
            || { tail -20 "$OUT/cache/$name.log" >&2; rm -f "$tarball.part"; exit 1; }
        mv "$tarball.part" "$tarball"
        fresh=1
    fi
    if [ "$fresh" = 1 ] || ! podman image exists "$image"; then  # a new import moves the tag
        log "podman import $tarball -> $image"
        podman import --quiet "$tarball" "$image" >/dev/null
    fi
    printf '%s\n' "$image"
}

# -- 2. the wheelhouse and the requirement sets ----------------------------------------------------

requirement_sets() {  # writes context/requirements-{full,serve}.txt from pyproject.toml
    python3 - "$ROOT/pyproject.toml" "$CONTEXT" "$FULL_DROP" "$SERVE_KEEP" <<'EOF'
import re, sys, tomllib
from pathlib import Path
pyproject, context, drop, keep = sys.argv[1], Path(sys.argv[2]), set(sys.argv[3].split()), sys.argv[4].split()
deps = tomllib.load(open(pyproject, "rb"))["project"]["dependencies"]
def name(req): return re.split(r"[\[=<>!~; ]", req, maxsplit=1)[0].lower()
full = [re.sub(r"^flwr\[simulation\]", "flwr", d) for d in deps if name(d) not in drop]
names = {name(d) for d in deps}
unknown = [k for k in keep if k not in names]
if unknown:
    sys.exit(f"images: serve requirements {unknown} are not pyproject.toml dependencies")
serve = [d for d in deps if name(d) in keep]
head = "# generated by deploy/images/build.sh from pyproject.toml; versions: requirements.lock (-c)\n"
(context / "requirements-full.txt").write_text(head + "\n".join(full) + "\n")
(context / "requirements-serve.txt").write_text(head + "\n".join(serve) + "\n")
EOF
}

wheelhouse() {
    local wheels="$OUT/wheels" stamp key
    key="$(cat "$ROOT/requirements.lock" "$HERE/constraints.txt" "$CONTEXT/requirements-full.txt" "$CONTEXT/requirements-serve.txt" | sha256sum | cut -c1-16)"
    stamp="$wheels/.complete-$key"
    if [ ! -e "$stamp" ]; then
        [ -x "$PYTHON" ] || { log "$PYTHON not found: run \`make install\` (or set PYTHON to an interpreter with pip)"; exit 1; }
        log "pip wheel -c requirements.lock -> $wheels"
        rm -rf "$wheels"; mkdir -p "$wheels"
        "$PYTHON" -m pip wheel --quiet --prefer-binary --wheel-dir "$wheels" -c "$ROOT/requirements.lock" -c "$HERE/constraints.txt" \
            -r "$CONTEXT/requirements-full.txt" -r "$CONTEXT/requirements-serve.txt"
        "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$wheels" -c "$HERE/constraints.txt" pip
        # a CUDA torch build (what plain PyPI gives) would add gigabytes of nvidia-* wheels
        if ls "$wheels" | grep -qi '^nvidia'; then
            log "the wheelhouse has nvidia-* wheels: the host's pip found a CUDA torch; give it the CPU wheel (find-links)"
            exit 1
        fi
        touch "$stamp"
    fi
    # hard links into the context (same file system), else a copy
    rm -rf "$CONTEXT/wheels"
    cp -al "$wheels" "$CONTEXT/wheels" 2>/dev/null || cp -a "$wheels" "$CONTEXT/wheels"
}

# -- 3. the build context --------------------------------------------------------------------------

APP_FILES=(pyproject.toml README.md studies)  # with the packages: what `git status` is asked about
APP_PACKAGES=(fedcare cli deploy client server strategies privacy export inference simulations)

app_tree() {  # what fedcare.APP_DIR needs: the App's pyproject.toml and README, its packages' .py files, the studies
    local app="$CONTEXT/app"
    rm -rf "$app"; mkdir -p "$app"
    (
        cd "$ROOT"
        {
            printf '%s\n' pyproject.toml README.md studies/*.toml
            # deploy/images is this build, deploy/k8s and the like are deployment files: not the App
            find "${APP_PACKAGES[@]}" -path deploy/images -prune -o -name __pycache__ -prune -o -type f -name '*.py' -print
        } | LC_ALL=C sort | xargs -d '\n' cp --parents --preserve=mode,timestamps --target-directory="$app"
    )
    # no key material can reach a layer (the layer scan of tests/test_images.py checks the images too)
    local found
    # an armour line followed by a key body (fedcare/keys.py names the armour, it holds no key)
    found="$(grep -rlIzP -e '-{5}BEGIN [A-Z ]*(PRIVATE|PROTECTED) KEY-{5}\s+[A-Za-z0-9+/=:,\s-]{40,}?-{5}END' "$app" || true)"
    if [ -n "$found" ]; then
        log "private key material in the app tree: $found"
        exit 1
    fi
}

# -- 4. the images -----------------------------------------------------------------------------------

build_role() {  # ROLE
    local role="$1" image="fedcare-$1" description
    case "$role" in
        coordinator) description="fedcare coordinator: Flower SuperLink behind its nginx network edge (fedcare coordinator start)" ;;
        node) description="fedcare hospital node: Flower SuperNode and its ClientApp worker (fedcare node start)" ;;
        serve) description="fedcare on-site inference service over a verified ONNX package (fedcare serve)" ;;
        *) log "unknown role '$role' (coordinator, node, serve)"; exit 2 ;;
    esac
    log "podman build $image:$VERSION"
    local started=$SECONDS
    podman build --quiet --isolation chroot --format docker --layers \
        --file "$HERE/Containerfile" --target "$role" \
        --build-arg OS_IMAGE="$OS_IMAGE" --build-arg EDGE_IMAGE="$EDGE_IMAGE" \
        --label org.opencontainers.image.title="$image" \
        --label org.opencontainers.image.version="$VERSION" \
        --label org.opencontainers.image.revision="$REVISION" \
        --label org.opencontainers.image.description="$description" \
        --label org.opencontainers.image.source="fedcare (git $REVISION)" \
        --label org.opencontainers.image.licenses="Apache-2.0" \
        --label io.fedcare.source-tree="$TREE_STATE" \
        --label io.fedcare.app-tree-sha256="$APP_SHA" \
        --tag "localhost/$image:$VERSION" --tag "localhost/$image:latest" \
        "$CONTEXT" >/dev/null
    log "built localhost/$image:$VERSION ($((SECONDS - started)) s, $(podman image inspect --format '{{.Size}}' "localhost/$image:$VERSION" | awk '{printf "%.0f MB", $1/1e6}'))"
}

main() {
    need_tools
    mkdir -p "$OUT/cache"
    CONTEXT="$OUT/context"
    mkdir -p "$CONTEXT"
    VERSION="$(project_field version)"
    REVISION="$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)"
    TREE_STATE="clean"
    if [ -n "$(git -C "$ROOT" status --porcelain -- "${APP_FILES[@]}" "${APP_PACKAGES[@]}" requirements.lock 2>/dev/null)" ]; then
        TREE_STATE="modified: uncommitted changes on top of the revision"
    fi
    if [ "${FEDCARE_IMAGES_REFRESH_OS:-0}" = 1 ]; then  # new root filesystems (security updates)
        rm -f "$OUT"/cache/fedcare-os-*.tar
    fi
    OS_IMAGE="$(rootfs fedcare-os "$OS_PACKAGES")"
    EDGE_IMAGE="$OS_IMAGE"
    if printf '%s\n' "${ROLES[@]}" | grep -qx coordinator; then
        EDGE_IMAGE="$(rootfs fedcare-os-edge "$EDGE_PACKAGES")"
    fi
    requirement_sets
    wheelhouse
    app_tree
    APP_SHA="$(cd "$CONTEXT/app" && find . -type f | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-64)"
    cp "$ROOT/requirements.lock" "$CONTEXT/requirements.lock"
    cp "$HERE/constraints.txt" "$CONTEXT/constraints.txt"
    cp "$HERE/healthcheck.py" "$HERE/fedcare-entrypoint" "$CONTEXT/"
    for role in "${ROLES[@]}"; do
        build_role "$role"
    done
    # the images these tags pointed to before (fedcare's only: by their label); the stages' layer cache stays
    podman image prune --force --filter label=io.fedcare.app-tree-sha256 >/dev/null
}

main
