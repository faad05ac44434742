"""Headless Chromium through selenium, shared by the browser tests (the HTML report, the chat
page) and benchmarks/screenshot_chat.py.

Needs the ``selenium`` package and Debian's ``chromium`` and ``chromium-driver`` (``apt-get
install -y chromium chromium-driver``), or their paths in ``EDGEQUANT_CHROMIUM`` and
``EDGEQUANT_CHROMEDRIVER``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-sync",
         "--disable-dev-shm-usage")
INSTALL = "apt-get install -y chromium chromium-driver"


class BrowserMissing(RuntimeError):
    """Chromium or its driver is not installed."""


def find_exe(env: str, *names: str) -> str:
    """The first of ``$env`` and ``names`` that is a program on PATH or a file."""
    for cand in (os.environ.get(env), *names):
        if cand and (shutil.which(cand) or Path(cand).is_file()):
            return shutil.which(cand) or cand
    raise BrowserMissing(f"{names[0]} not found: {INSTALL} (or set {env})")


def start_chromium(size: tuple[int, int] | None = None, *flags: str) -> Any:
    """A headless Chromium ``WebDriver`` that keeps the page's console log (``get_log(
    "browser")``); ``size`` is the window's (width, height) in CSS pixels."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = find_exe("EDGEQUANT_CHROMIUM", "/usr/bin/chromium", "chromium",
                                    "chromium-browser")
    for flag in (*FLAGS, *flags):
        opts.add_argument(flag)
    if size is not None:
        opts.add_argument(f"--window-size={size[0]},{size[1]}")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(find_exe("EDGEQUANT_CHROMEDRIVER", "/usr/bin/chromedriver",
                               "chromedriver"))
    driver = webdriver.Chrome(service=service, options=opts)
    driver.set_page_load_timeout(60)
    return driver
