#!/bin/sh
# Entrypoint of the nightcrier agent image: makes sure the agent has a writable HOME, then runs
# the given command.
#
# The CLIs keep settings, logins and sessions under HOME. The image's /home/agent is writable by
# any uid, but a container may run with a read-only root filesystem, or with HOME on an empty
# tmpfs; so HOME is moved to a fresh directory under /tmp when it is not writable, and the
# image's default settings (/usr/share/nightcrier-agent/skel) are copied into it where missing.
set -eu

home=${HOME:-/home/agent}
mkdir -p "$home" 2>/dev/null || true
if ! { [ -d "$home" ] && [ -w "$home" ]; }; then
    home=$(mktemp -d /tmp/home.XXXXXX 2>/dev/null) || home=
fi
if [ -n "$home" ]; then
    export HOME="$home"
    # -n: never overwrite what the operator mounted or an earlier run left.
    cp -Rn /usr/share/nightcrier-agent/skel/. "$HOME"/ 2>/dev/null || true
fi

# Model endpoints (an LLM gateway, a proxy) come in as environment variables. claude reads
# ANTHROPIC_BASE_URL itself; codex and gemini need a word in their settings as well.
if [ -n "$home" ] && [ -n "${OPENAI_BASE_URL:-}" ]; then
    # codex takes its endpoint only from config.toml; top-level keys go before any [table].
    config="$HOME/.codex/config.toml"
    if ! grep -qs '^openai_base_url' "$config"; then
        mkdir -p "$HOME/.codex"
        url=$(printf '%s' "$OPENAI_BASE_URL" | sed 's/[\\"]/\\&/g')
        { printf 'openai_base_url = "%s"\n' "$url"; cat "$config" 2>/dev/null || true; } >"$config.new"
        mv "$config.new" "$config"
    fi
fi
if [ -n "$home" ] && [ -n "${GOOGLE_GEMINI_BASE_URL:-}" ] && [ -n "${GEMINI_API_KEY:-}" ] &&
    [ ! -e "$HOME/.gemini/settings.json" ]; then
    # With GOOGLE_GEMINI_BASE_URL alone gemini picks a "gateway" sign-in that its own headless
    # check rejects ("Invalid auth method selected"); the API-key sign-in uses the same URL.
    mkdir -p "$HOME/.gemini"
    printf '{"security": {"auth": {"selectedType": "gemini-api-key"}}}\n' >"$HOME/.gemini/settings.json"
fi

if [ $# -eq 0 ]; then
    set -- bash
fi
exec "$@"
