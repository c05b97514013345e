"""A screenshot of the page at ``/`` on a finished run: serve it, build a history, recommend.

    python benchmarks/screenshot_page.py --run runs/demo --out runs/demo/page.png \
        --history "Toy Story (1995)" --history "Heat (1995)" --history "Star Wars (1977)"

Needs what ``make test-browser`` installs (Debian's chromium and chromium-driver, selenium).
Prints the text of the results it photographed. Asserts nothing; tests/test_browser.py does.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1500,1100")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="finished run folder (run.yaml)")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--history", action="append", required=True, help="a catalogue title, oldest first")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bigrec = Path(sys.executable).with_name("bigrec")
    server = subprocess.Popen([str(bigrec), "serve", "--run", args.run, "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"bigrec serve --run {args.run} did not start")
            time.sleep(1)
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium")
        for flag in FLAGS:
            options.add_argument(flag)
        driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))
        try:
            wait = WebDriverWait(driver, 300)
            driver.get(base + "/")
            wait.until(lambda d: d.find_element(By.ID, "run-info").text.startswith("run "))
            for title in args.history:
                box = driver.find_element(By.ID, "search")
                box.clear()
                box.send_keys(title[:12])
                wait.until(lambda d, t=title: any(li.text == t for li in d.find_elements(By.CSS_SELECTOR, "#suggestions li")))
                next(li for li in driver.find_elements(By.CSS_SELECTOR, "#suggestions li") if li.text == title).click()
            driver.find_element(By.ID, "go").click()
            wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#results table")))
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(args.out)
            print(driver.find_element(By.ID, "results").text)
        finally:
            driver.quit()
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
