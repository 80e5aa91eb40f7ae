#!/usr/bin/env bash
# Documented check (issue 21): the report logged to a parent run opens from the MLflow UI's
# artifact view in headless Chromium. Usage:
#   docs/results/mlflow_ui_check.sh TRACKING_DB PARENT_RUN_ID OUT.png
# TRACKING_DB is the SQLite file the ablation logged to (e.g. /tmp/x/mlflow.db). The server binds
# 127.0.0.1 on a free port, uses that store read-only in practice, and is stopped at the end.
set -euo pipefail
db=$(readlink -f "$1"); run=$2; png=$(readlink -f "$3")
work=$(mktemp -d)
port=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
exp=$(python - "$db" "$run" <<'EOF'
import sys
from mlflow.tracking import MlflowClient
print(MlflowClient(f"sqlite:///{sys.argv[1]}").get_run(sys.argv[2]).info.experiment_id)
EOF
)
mlflow server --backend-store-uri "sqlite:///$db" --host 127.0.0.1 --port "$port" \
    --workers 1 > "$work/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 60); do curl -sf "http://127.0.0.1:$port/health" > /dev/null && break; sleep 1; done
url="http://127.0.0.1:$port/#/experiments/$exp/runs/$run/artifacts/report/report.html"
echo "opening $url"
# the raw artifact the UI fetches must be the whole page, with its images inline
curl -sf "http://127.0.0.1:$port/get-artifact?path=report/report.html&run_uuid=$run" \
    | grep -c 'data:image/png;base64,' | sed 's/^/inline images served: /'
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --user-data-dir="$work/profile" --window-size=1500,1300 --virtual-time-budget=20000 \
    --hide-scrollbars --screenshot="$png" "$url" 2> "$work/chromium.log" || {
        tail -20 "$work/chromium.log"; exit 1; }
echo "screenshot: $png"
