#!/bin/sh
# `make demo`: start the daemon on the embedded defaults, ask one question, speak it, stop.
set -eu
PY=${1:-python3}
cd "$(dirname "$0")/.."
DEMO_DIR=$(mktemp -d /tmp/voxpipe-demo.XXXXXX)
export VOXPIPE_BUS__RUNTIME_DIR="$DEMO_DIR/run"
export VOXPIPE_HISTORY__DB_PATH="$DEMO_DIR/history.db"
export VOXPIPE_PLAYER__WAV_DIR="$DEMO_DIR/wav"
export VOXPIPE_LOG__LEVEL=warning
export VOXPIPE_LLM__PROFILES__LOCAL__MAX_TOKENS=${VOXPIPE_LLM__PROFILES__LOCAL__MAX_TOKENS:-80}

"$PY" -m launcher run > "$DEMO_DIR/daemon.log" 2>&1 &
DAEMON=$!
trap 'kill -TERM $DAEMON 2>/dev/null; wait $DAEMON 2>/dev/null || true' EXIT

echo "starting voxpipe (log: $DEMO_DIR/daemon.log) ..."
i=0
until grep -q "voxpipe ready" "$DEMO_DIR/daemon.log"; do
    i=$((i + 1))
    if [ $i -gt 600 ] || ! kill -0 $DAEMON 2>/dev/null; then
        echo "voxpipe did not start:"; cat "$DEMO_DIR/daemon.log"; exit 1
    fi
    sleep 0.2
done
"$PY" -m launcher status
echo
echo "> Tell me a short fact about the Moon."
"$PY" -m launcher say "Tell me a short fact about the Moon." --session demo
echo "stopping voxpipe ..."
