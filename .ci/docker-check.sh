#!/usr/bin/env bash
# Checks the Dockerfiles without a Docker daemon: each builds with a Rust at least the workspace's
# rust-version (a `FROM rust:X.Y` tag or rustup's `--default-toolchain X.Y.Z`), and each image's
# final stage runs `candlewick serve` as a user other than root, listening on 0.0.0.0, with a
# HEALTHCHECK on /health.
#   .ci/docker-check.sh                  every docker/Dockerfile.*
#   .ci/docker-check.sh FILE...          only these
set -euo pipefail
cd "$(dirname "$0")/.."

# The server's default port (crates/server/src/config.rs); the images EXPOSE it.
port=8080

rust_version=$(sed -n '/^\[workspace\.package\]/,/^\[/s/^rust-version *= *"\([0-9.]*\)".*/\1/p' Cargo.toml)
if [ -z "$rust_version" ]; then
    echo "docker-check: Cargo.toml: no rust-version in [workspace.package]" >&2
    exit 1
fi

if [ "$#" -gt 0 ]; then
    files=("$@")
else
    files=(docker/Dockerfile.*)
fi

# Whether version $1 >= version $2 (dotted numbers; 1.89 = 1.89.0).
version_at_least() {
    [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n 1)" = "$2" ]
}

# Whether the final stage has an instruction matching the extended regex $1.
has() {
    printf '%s\n' "$final" | grep -qiE "$1"
}

failures=0
fail() {
    echo "docker-check: $1: $2" >&2
    failures=$((failures + 1))
}

for file in "${files[@]}"; do
    if [ ! -f "$file" ]; then
        fail "$file" "no such file"
        continue
    fi
    # One instruction per line: comments dropped, `\` continuations joined.
    instructions=$(grep -v '^[[:space:]]*#' "$file" | sed -e ':join' -e '/\\$/{N;s/\\\n//;b join' -e '}')

    # The Rust that builds it: every `FROM rust:TAG` and every `--default-toolchain VERSION`.
    versions=()
    while read -r tag; do
        [ -n "$tag" ] || continue
        version=$(printf '%s\n' "$tag" | grep -oE '^[0-9]+\.[0-9]+(\.[0-9]+)?' || true)
        if [ -z "$version" ]; then
            fail "$file" "FROM rust:$tag does not pin a Rust version (want rust:X.Y >= $rust_version)"
        else
            versions+=("$version")
        fi
    done < <(printf '%s\n' "$instructions" | grep -ioE '^[[:space:]]*FROM[[:space:]]+(docker\.io/)?(library/)?rust:[^[:space:]]+' | sed 's/.*rust://')
    while read -r toolchain; do
        [ -n "$toolchain" ] || continue
        if [[ "$toolchain" =~ ^[0-9]+\.[0-9]+(\.[0-9]+)?$ ]]; then
            versions+=("$toolchain")
        else
            fail "$file" "--default-toolchain $toolchain is not a pinned version (want X.Y.Z >= $rust_version)"
        fi
    done < <(printf '%s\n' "$instructions" | grep -oE -- '--default-toolchain[= ][^[:space:]]+' | sed -E 's/--default-toolchain[= ]//')
    if ! printf '%s\n' "$instructions" | grep -qiE '^[[:space:]]*FROM[[:space:]]+(docker\.io/)?(library/)?rust:|--default-toolchain'; then
        fail "$file" "no Rust version found (neither FROM rust:X.Y nor rustup --default-toolchain X.Y.Z)"
    fi
    for version in "${versions[@]}"; do
        if ! version_at_least "$version" "$rust_version"; then
            fail "$file" "builds with Rust $version, older than the workspace's rust-version $rust_version"
        fi
    done

    # The final stage: everything after the last FROM.
    final=$(printf '%s\n' "$instructions" | awk 'toupper($1) == "FROM" { stage = "" } { stage = stage $0 "\n" } END { printf "%s", stage }')
    has '^[[:space:]]*ENTRYPOINT[[:space:]]+\[[[:space:]]*"candlewick"[[:space:]]*\][[:space:]]*$' \
        || fail "$file" 'final stage lacks ENTRYPOINT ["candlewick"]'
    has '^[[:space:]]*CMD[[:space:]]+\[[[:space:]]*"serve"[[:space:]]*\][[:space:]]*$' \
        || fail "$file" 'final stage lacks CMD ["serve"]'
    has '^[[:space:]]*ENV[[:space:]].*CANDLEWICK_HOST[= ]"?0\.0\.0\.0"?([[:space:]]|$)' \
        || fail "$file" 'final stage lacks ENV CANDLEWICK_HOST=0.0.0.0 (the server would listen on the container'"'"'s loopback only)'
    has "^[[:space:]]*EXPOSE[[:space:]].*\\b$port\\b" \
        || fail "$file" "final stage lacks EXPOSE $port"
    has '^[[:space:]]*HEALTHCHECK[[:space:]].*CMD[[:space:]].*/health\b' \
        || fail "$file" 'final stage lacks a HEALTHCHECK whose CMD requests /health'
    user=$(printf '%s\n' "$final" | awk 'toupper($1) == "USER" { user = $2 } END { print user }')
    if [ -z "$user" ]; then
        fail "$file" "final stage has no USER: the server would run as root"
    elif [[ "$user" =~ ^(root|0)(:.*)?$ ]]; then
        fail "$file" "final stage runs as USER $user: want a user other than root"
    fi
done

if [ "$failures" -gt 0 ]; then
    echo "docker-check: $failures problem(s) in ${files[*]}" >&2
    exit 1
fi
echo "docker-check: ${files[*]}: Rust >= $rust_version, ENTRYPOINT candlewick serve as a non-root user on 0.0.0.0:$port, HEALTHCHECK /health"
