"""The documentation site as a reader sees it: built, served, opened in a browser.

    python docs/results/site/site_check.py OUT_DIR [--mkdocs PATH]

Builds the site with ``mkdocs build --strict`` into a temporary folder, serves it on 127.0.0.1
(a free port), opens the home page and the leaderboard page (at its Figures) in headless
Chromium, waits until every image on each page has decoded, counts the tables and images, saves
a screenshot of each window (``home.png``, ``leaderboard.png`` in OUT_DIR) and stops every
process it started. Exit 0 only if each page rendered its tables and every image decoded: a strict build
checks links, not that a table's pipes became a table or that an image path works once
served. Driven over the DevTools protocol, as ``docs/results/mlflow_ui_check.py`` is, because a
fixed ``--screenshot`` delay is a guess on a busy machine.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import http.server
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
_spec = importlib.util.spec_from_file_location("mlflow_ui_check",
                                               ROOT / "docs" / "results" / "mlflow_ui_check.py")
ui = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ui)

# Pages a first-time reader opens, and what each must show: at least this many tables, images.
PAGES = {"home": ("", 1, 0), "leaderboard": ("leaderboard/#figures", 3, 1)}
PROBE = """(() => {
  const imgs = [...document.images].filter(i => !i.src.startsWith('data:'));
  return {title: document.title, tables: document.querySelectorAll('article table').length,
          images: imgs.length, decoded: imgs.filter(i => i.complete && i.naturalWidth > 0).length,
          height: document.documentElement.scrollHeight};
})()"""


async def shoot(devtools: int, url: str, png: Path, timeout: float) -> dict:
    import aiohttp

    base = f"http://127.0.0.1:{devtools}"
    async with aiohttp.ClientSession() as http_client:
        async with http_client.put(f"{base}/json/new") as r:
            page = json.loads(await r.text())
        async with http_client.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            await ui._call(ws, 1, "Page.navigate", url=url)
            end, found = time.time() + timeout, {}
            while time.time() < end:
                await asyncio.sleep(1)
                res = await ui._call(ws, 2, "Runtime.evaluate", expression=PROBE,
                                     returnByValue=True)
                found = res.get("result", {}).get("value") or {}
                if found.get("tables") is not None and found["decoded"] == found["images"] \
                        and found["title"]:
                    break
            await asyncio.sleep(1)  # let the scroll to the #anchor paint
            shot = await ui._call(ws, 4, "Page.captureScreenshot", format="png")
            png.write_bytes(base64.b64decode(shot["data"]))
            return found


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:  # one line per file would bury the verdict
        pass


def serve(folder: Path) -> tuple[http.server.ThreadingHTTPServer, int]:
    handler = functools.partial(QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--mkdocs", default=shutil.which("mkdocs") or str(ROOT / ".venv-docs/bin/mkdocs"))
    ap.add_argument("--timeout", type=float, default=120)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp) / "site"
        subprocess.run([args.mkdocs, "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                       check=True, capture_output=True, env={**os.environ,
                                                             "NO_MKDOCS_2_WARNING": "1"})
        server, port = serve(site)
        devtools = ui.free_port()
        browser = subprocess.Popen(
            ["chromium", *ui.FLAGS, f"--user-data-dir={tmp}/profile",
             f"--remote-debugging-port={devtools}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            ui.wait_http(f"http://127.0.0.1:{devtools}/json/version", args.timeout)
            for name, (path, min_tables, min_images) in PAGES.items():
                url = f"http://127.0.0.1:{port}/{path}"
                found = asyncio.run(shoot(devtools, url, args.out / f"{name}.png", args.timeout))
                good = (found.get("tables", 0) >= min_tables and found.get("images", 0) >= min_images
                        and found.get("decoded") == found.get("images"))
                ok &= good
                print(f"{name}: {url} -> {found} {'ok' if good else 'NOT RENDERED'}")
        finally:
            server.shutdown()
            os.killpg(browser.pid, signal.SIGTERM)
            try:
                browser.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(browser.pid, signal.SIGKILL)
                browser.wait()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
