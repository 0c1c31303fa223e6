# Sourced by scripts that need a running server of their own.
#   start_server BINARY DATABASE [EXTRA-SERVE-ARGUMENTS...]
# starts `BINARY serve` on a free loopback port against DATABASE, waits for its ready line and sets
# `server_pid` and `url`; `stop_server` sends SIGTERM and waits. Callers trap stop_server on EXIT.
server_pid=
url=

start_server() {
    local binary=$1 database=$2 ready
    shift 2
    ready=$(mktemp)
    "$binary" serve --port 0 --database "$database" --no-access-log "$@" >"$ready" &
    server_pid=$!
    wait_for_ready_line "$ready" "$server_pid"
    url=$(grep -o 'http://127\.0\.0\.1:[0-9]*' "$ready" | head -1)
    rm -f "$ready"
    [ -n "$url" ] || { echo "the server did not start" >&2; return 1; }
}

# wait_for_ready_line FILE PID: waits until FILE has the server's "listening" line or PID has exited;
# a busy machine starts late, so only the process's death (or 5 minutes) ends the wait.
wait_for_ready_line() {
    local file=$1 pid=$2
    for _ in $(seq 3000); do
        grep -q listening "$file" 2>/dev/null && return 0
        kill -0 "$pid" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

stop_server() {
    [ -n "$server_pid" ] || return 0
    kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
    server_pid=
}

# The debug build of lora-aggregator, built if missing.
built_server() {
    [ -x .build/debug/lora-aggregator ] || swift build --product lora-aggregator >&2
    echo .build/debug/lora-aggregator
}
