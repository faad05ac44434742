"""Screenshots of the chat page and the arena of ``edgequant serve`` with real answers.

The zoo's SmolLM2-135M is served twice by the real server on a loopback port: as it is
(float32, torch) and quantized in memory by a recipe (default RTN w4g128), with each model's
size and bits per weight counted from what it stores and the quantized one's KL divergence
against the float model measured by ``eq.evaluate`` (wiki, ``--kld-tokens`` tokens). Headless
Chromium then asks two questions on the chat page and one in the arena (sampling with a fixed
seed, so the pictures are reproducible: greedy decoding of a 135M model loops) and saves both
at 1280x800:

    PYTHONPATH=src python benchmarks/screenshot_chat.py     # docs/images/{chat,arena}.png
    PYTHONPATH=src python benchmarks/screenshot_chat.py --recipe gptq --scheme w3g128
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # tests/browser.py: the one headless-Chromium set-up

CHAT = ["What is quantization of a neural network? Answer in two sentences.",
        "Give me three tips for running a small language model on a phone."]
ARENA = "Write a short poem about a tiny model that lives on a phone."
SIZE = (1280, 800)


def served_models(recipe: str, scheme: str, kld_tokens: int) -> list[Any]:
    """The float model and its quantized copy, each with the meta the page shows."""
    import edgequant as eq
    from edgequant.eval.size import model_size_info
    from edgequant.models import zoo
    from edgequant.serve import ServedModel

    base_dir = zoo.pull("smollm2-135m")
    base = eq.load(base_dir)
    quant = eq.quantize(eq.load(base_dir), recipe, scheme)
    kld = None
    if kld_tokens:
        res = eq.evaluate(quant, ["kld"], kld_base=base_dir, max_tokens=kld_tokens)
        kld = res.kld_mean
    out = []
    for name, model, method, path, k in (
            ("smollm2-135m", base, None, base_dir, 0.0),
            (f"smollm2-135m-{recipe}-{scheme}", quant, recipe, None, kld)):
        size = model_size_info(model, path)
        meta = {"size_bytes": size["size_bytes"], "bits_per_weight": size["bits_per_weight"],
                "kld": k, "method": method, "scheme": scheme if method else None}
        # opened by the server's loader, which adds what the engine knows (its backend)
        out.append(ServedModel(name, loader=lambda m=model: eq.open(m), meta=meta))
    return out


def _wait(driver: Any, cond: Any, timeout: float = 600) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout, poll_frequency=0.1).until(cond)


def _idle(driver: Any) -> None:
    _wait(driver, lambda d: d.execute_script("return document.body.dataset.busy") == "false")


def _shoot(driver: Any, path: Path) -> None:
    from edgequant.io_utils import atomic_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        tmp.write_bytes(driver.get_screenshot_as_png())
    print(f"wrote {path}")


def screenshots(url: str, models: list[Any], out: Path, max_tokens: int) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    from tests.browser import start_chromium

    driver = start_chromium(SIZE)
    try:
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": SIZE[0], "height": SIZE[1], "deviceScaleFactor": 1, "mobile": False})
        driver.get(f"{url}/")
        driver.execute_script(
            "localStorage.clear(); localStorage.setItem('edgequant.settings', "
            "JSON.stringify({temperature: 0.6, top_p: 0.9, top_k: 40, max_tokens: arguments[0],"
            " seed: 7, system: ''}))", max_tokens)
        driver.get(f"{url}/")
        _wait(driver, lambda d: d.execute_script("return document.body.dataset.ready"))
        Select(driver.find_element(By.ID, "model")).select_by_value(models[1].id)
        for question in CHAT:
            driver.find_element(By.ID, "prompt").send_keys(question + "\n")
            _wait(driver, lambda d: d.execute_script("return document.body.dataset.busy")
                  == "true")
            _idle(driver)
        _shoot(driver, out / "chat.png")

        driver.find_element(By.ID, "tab-arena").click()
        Select(driver.find_element(By.ID, "model-left")).select_by_value(models[0].id)
        Select(driver.find_element(By.ID, "model-right")).select_by_value(models[1].id)
        driver.find_element(By.ID, "arena-prompt").send_keys(ARENA + "\n")
        _wait(driver, lambda d: d.execute_script("return document.body.dataset.busy") == "true")
        _idle(driver)
        time.sleep(0.3)   # the last frame's paint
        _shoot(driver, out / "arena.png")
        errors = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        if errors:
            raise SystemExit(f"the page logged errors: {errors}")
    finally:
        driver.quit()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    ap.add_argument("--recipe", default="rtn")
    ap.add_argument("--scheme", default="w4g128")
    ap.add_argument("--kld-tokens", type=int, default=4096,
                    help="wiki tokens the KL divergence is measured on (0: not measured)")
    ap.add_argument("--max-tokens", type=int, default=96, help="tokens per answer")
    args = ap.parse_args()

    from edgequant.serve import create_app
    from edgequant.serve.testing import running_server

    models = served_models(args.recipe, args.scheme, args.kld_tokens)
    for m in models:
        print(m.id, m.meta)
    with running_server(create_app(models, parallel=2)) as url:
        screenshots(url, models, args.out, args.max_tokens)


if __name__ == "__main__":
    main()
