"""Documented check: a report logged to a parent run opens from the MLflow UI.

    python docs/results/mlflow_ui_check.py TRACKING_DB PARENT_RUN_ID OUT.png

Starts ``mlflow server`` on the SQLite store, bound to 127.0.0.1 on a free port, opens the run's
artifact view of report/report.html in headless Chromium, waits until the page's iframe (MLflow
renders HTML artifacts in one) holds the report with every inline image decoded, prints what it
found, saves a screenshot, and stops both processes. Exit 0 only if the report rendered.
Driven over the DevTools protocol (aiohttp, already a dependency through Ray) because a fixed
``--screenshot`` delay is a guess, and on a busy machine the UI can take minutes to load.
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--window-size=1500,1400"]
# Evaluated inside the report's own frame: MLflow shows an HTML artifact as a blob: URL in a
# sandboxed iframe the page cannot look into, so the check attaches to that frame directly.
PROBE = """(() => {
  const imgs = [...document.images];
  return {title: document.title, tables: document.querySelectorAll('table').length,
          images: imgs.length, decoded: imgs.filter(i => i.complete && i.naturalWidth > 0).length,
          widths: imgs.map(i => i.naturalWidth)};
})()"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float) -> None:
    end = time.time() + timeout
    while time.time() < end:
        try:
            urllib.request.urlopen(url, timeout=5).read()
            return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"no answer from {url} within {timeout:.0f} s")


async def _call(ws, i: int, method: str, **params) -> dict:
    await ws.send_json({"id": i, "method": method, "params": params})
    async for msg in ws:
        data = json.loads(msg.data)
        if data.get("id") == i:
            return data.get("result", {})
    return {}


async def render(devtools: int, url: str, png: Path, timeout: float) -> dict:
    import aiohttp

    base = f"http://127.0.0.1:{devtools}"
    origin = url.split("/#/")[0]
    async with aiohttp.ClientSession() as http:
        async with http.put(f"{base}/json/new") as r:  # a blank tab: a URL here would lose
            page = json.loads(await r.text())        # its #fragment
        async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            await _call(ws, 1, "Page.navigate", url=url)
            end, found = time.time() + timeout, {}
            while time.time() < end and not (found.get("images")
                                              and found["decoded"] == found["images"]):
                await asyncio.sleep(3)
                async with http.get(f"{base}/json/list") as r:
                    frames = [t for t in json.loads(await r.text())
                              if t["url"].startswith(f"blob:{origin}/")]
                if not frames:
                    continue
                async with http.ws_connect(frames[0]["webSocketDebuggerUrl"],
                                           max_msg_size=0) as fw:
                    res = await _call(fw, 1, "Runtime.evaluate", expression=PROBE,
                                      returnByValue=True)
                found = res.get("result", {}).get("value") or {}
            await asyncio.sleep(2)  # let the last paint land
            shot = await _call(ws, 2, "Page.captureScreenshot", format="png")
            png.write_bytes(base64.b64decode(shot["data"]))
            return found


def main(db: str, run: str, png: str, timeout: float = 600) -> int:
    from mlflow.tracking import MlflowClient

    db_path = Path(db).resolve()
    exp = MlflowClient(f"sqlite:///{db_path}").get_run(run).info.experiment_id
    port, devtools = free_port(), free_port()
    with tempfile.TemporaryDirectory() as tmp:
        server = subprocess.Popen(
            ["mlflow", "server", "--backend-store-uri", f"sqlite:///{db_path}", "--host",
             "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=open(Path(tmp) / "server.log", "w"), stderr=subprocess.STDOUT,
            start_new_session=True)
        browser = None
        try:
            wait_http(f"http://127.0.0.1:{port}/health", timeout)
            browser = subprocess.Popen(
                ["chromium", *FLAGS, f"--user-data-dir={tmp}/profile",
                 f"--remote-debugging-port={devtools}", "about:blank"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            wait_http(f"http://127.0.0.1:{devtools}/json/version", 120)
            url = f"http://127.0.0.1:{port}/#/experiments/{exp}/runs/{run}/artifacts/report/report.html"
            print(f"opening {url}", flush=True)
            found = asyncio.run(render(devtools, url, Path(png), timeout))
        finally:
            for proc in (browser, server):  # the processes this script started, and their children
                if proc is not None:
                    os.killpg(proc.pid, signal.SIGTERM)
                    try:
                        proc.wait(60)
                    except subprocess.TimeoutExpired:  # a loaded machine: stop it for good
                        os.killpg(proc.pid, signal.SIGKILL)
                        proc.wait()
    print(f"report iframe: {found}")
    print(f"screenshot: {png}")
    ok = found.get("images", 0) >= 1 and found["decoded"] == found["images"] \
        and found["tables"] >= 1
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    sys.exit(main(*sys.argv[1:]))
