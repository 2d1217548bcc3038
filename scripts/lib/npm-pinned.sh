# Sourced by the install scripts of npm tools (install-azurite.sh, install-asyncapi-parser.sh):
# installs one pinned npm package into a prefix of its own under <repo>/.natty (git-ignored, no
# global install) when it is missing or another version. Every diagnostic goes to stderr, so the
# caller's stdout carries only the path it prints.
#
#     npm_pinned <log name> <package> <version> <prefix> [<file that must exist after>]

npm_pinned() {
    local name="$1" package="$2" pinned="$3" prefix="$4" needed="${5:-}"
    local manifest="$prefix/node_modules/$package/package.json"
    local marker="$prefix/.natty-installed"
    local version
    log() { printf '%s: %s\n' "$name" "$*" >&2; }
    # The installed version from the package's manifest, or a failure if there is none.
    installed_version() { node -p 'require(process.argv[1]).version' "$manifest" 2>/dev/null; }
    complete() { [[ -z "$needed" || -e "$needed" ]]; }

    if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
        log "node and npm are needed to install and run $package@$pinned (e.g. apt-get install nodejs npm)"
        return 1
    fi
    # 1. An install from an earlier run. Only the pinned version counts, so that bumping the pin
    #    replaces a stale install instead of silently keeping it. The marker is written last, so
    #    an interrupted install is never taken for a finished one.
    if complete && [[ -f "$marker" ]]; then
        if version="$(installed_version)" && [[ "$version" == "$pinned" ]]; then
            log "using $prefix ($package $pinned)"
            return 0
        fi
        log "replacing $prefix: $package there is not $pinned"
    fi
    # 2. The pinned release from the npm registry, local to the prefix.
    rm -rf "$prefix"
    mkdir -p "$prefix"
    log "installing $package@$pinned from npm into $prefix"
    # npm's output would otherwise land on stdout and break `X=$(...)`.
    npm install --prefix "$prefix" --no-audit --no-fund --no-save --loglevel=error "$package@$pinned" >&2
    if ! complete || ! version="$(installed_version)" || [[ "$version" != "$pinned" ]]; then
        log "installed into $prefix but $package is missing or not $pinned"
        return 1
    fi
    printf '%s\n' "$pinned" >"$marker"
    log "installed $package $version into $prefix"
}
