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
QUESTION=${VOXPIPE_DEMO_QUESTION:-"What is the capital of France?"}
echo "> $QUESTION"
# say exits non-zero unless the reply was spoken to its end; without a sound card the player writes
# a WAV file, which must then hold audio.
"$PY" -m launcher say "$QUESTION" --session demo 2> "$DEMO_DIR/say.err" || {
    cat "$DEMO_DIR/say.err"; echo "make demo: no speech was produced (daemon log: $DEMO_DIR/daemon.log)"; exit 1; }
cat "$DEMO_DIR/say.err"
WAV=$(sed -n 's/^audio written to //p' "$DEMO_DIR/say.err")
if [ -n "$WAV" ]; then
    "$PY" -c 'import sys, wave; n = wave.open(sys.argv[1]).getnframes(); sys.exit(0 if n else 1)' "$WAV" || {
        echo "make demo: $WAV holds no audio frames"; exit 1; }
fi
echo "stopping voxpipe ..."
