"""The web page in a real browser: Debian's headless Chromium, driven by Playwright, against
``python inference.py`` serving a tiny random model and three adapters (one MixLoRA) from a run's
output folder.

The panels must show the text the library's batched generation gives for each chosen adapter, the
MixLoRA panel its routing, an unchosen adapter no panel, and an empty instruction a message.
Without Chromium (or Playwright, or Gradio) the test skips, unless MLORA_REQUIRE_BROWSER=1 (CI),
where it fails. MLORA_SCREENSHOT=1 writes the page as README's screenshot (docs/webui.png).
"""

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from mlora.model.generation import GenerationSettings
from mlora.web.workspace import BASE, load_workspace
from tests.model.helpers import lora_cfg
from tests.model.test_mixlora import moe_cfg
from tests.tiny import save_tiny, tiny_model, word_tokenizer
from tests.web.test_server import free_port
from tests.web.test_workspace import save

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
INSTRUCTION, INPUT, TOKENS = "what is the cat ?", "the dog is big", 12


def chromium_or_skip() -> str:
    """Chromium's path; skips (fails under MLORA_REQUIRE_BROWSER=1) when a piece is missing."""
    missing = []
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        missing.append("Debian's chromium (apt-get install chromium)")
    for module in ("playwright", "gradio"):
        try:
            __import__(module)
        except ImportError:
            missing.append(f"the {module} package (pip install -e '.[test]')")
    if missing:
        why = "the browser test needs " + " and ".join(missing)
        if os.environ.get("MLORA_REQUIRE_BROWSER") == "1":
            pytest.fail(why + " (MLORA_REQUIRE_BROWSER=1)")
        pytest.skip(why)
    return chromium


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """``tiny-llama/`` and a run's ``output/`` beside it, the adapters naming their base relative to that folder
    (the page, and so the screenshot, shows the base as the adapters name it)."""
    tmp = tmp_path_factory.mktemp("browser")
    save_tiny(tiny_model(), word_tokenizer(), tmp / "tiny-llama")
    out = tmp / "output"
    save(lora_cfg("lora_0"), out / "lora_0", "tiny-llama")
    save(moe_cfg("mixlora_1", router_init_range=1.0), out / "mixlora_1", "tiny-llama")
    save(lora_cfg("dora_2", use_dora=True), out / "dora_2", "tiny-llama")
    return out


@pytest.fixture(scope="module")
def server(run_folder, tmp_path_factory):
    """``python inference.py --lora_weights output --port P`` as a user starts it: ``(process, url, log)``.

    Not waited for here: the expected answers are computed while it starts (see `page`).
    """
    chromium_or_skip()
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MLORA_COMPILE="0",
               HF_HOME=str(tmp_path_factory.mktemp("hf")))
    log = tmp_path_factory.mktemp("log") / "server.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen([sys.executable, str(ROOT / "inference.py"), "--lora_weights", "output",
                                 "--port", str(port)], stdout=sink, stderr=subprocess.STDOUT, env=env,
                                cwd=run_folder.parent)
    try:
        yield proc, f"http://127.0.0.1:{port}/", log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_until_served(proc, url, log, seconds=120):
    deadline = time.monotonic() + seconds
    while True:
        if proc.poll() is not None:
            pytest.fail(f"inference.py exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                pytest.fail(f"inference.py did not answer within {seconds} s:\n{log.read_text()}")
            time.sleep(0.3)


@pytest.fixture(scope="module")
def expected(run_folder):
    """What the library's batched generation answers with the chosen adapters (no Gradio involved)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLORA_COMPILE", "0")  # eager experts, as the server runs them
        workspace = load_workspace([str(run_folder)], base_model=str(run_folder.parent / "tiny-llama"))
        *_, final = workspace.answer(INSTRUCTION, INPUT, [BASE, "lora_0", "mixlora_1"],
                                     GenerationSettings(max_new_tokens=TOKENS))
    return {panel.name: panel for panel in final}, workspace.choices


@pytest.fixture
def page(server):
    from playwright.sync_api import sync_playwright

    proc, url, log = server
    wait_until_served(proc, url, log)
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=chromium_or_skip(), args=CHROMIUM_FLAGS,
                                         chromium_sandbox=False)
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        tab = context.new_page()
        tab.goto(url)
        tab.wait_for_selector("#generate")
        yield tab
        browser.close()


def status_shows(page, text, timeout=60_000):
    page.wait_for_function("t => (document.querySelector('#status')?.innerText || '').includes(t)", arg=text,
                           timeout=timeout)


def test_chosen_adapters_answer_side_by_side(server, expected, page):
    panels, choices = expected
    assert choices == [BASE, "dora_2", "lora_0", "mixlora_1"]  # panel i shows choices[i]
    page.get_by_role("checkbox", name="dora_2 (DoRA)").uncheck()
    page.locator("#panel-1").wait_for(state="hidden")
    tokens = page.locator("#max-new-tokens input[type=number]")
    tokens.fill(str(TOKENS))
    tokens.press("Enter")
    page.locator("#instruction textarea").fill(INSTRUCTION)
    page.locator("#input textarea").fill(INPUT)
    page.locator("#generate").click()
    status_shows(page, "Done:")
    for i, name in enumerate(choices):
        if name == "dora_2":
            assert not page.locator("#panel-1").is_visible()
            continue
        assert page.locator(f"#answer-{i} textarea").input_value() == panels[name].text, name
        assert panels[name].text.strip()
    # The routing view: one cell per MixLoRA layer and generated token, the experts chosen there.
    cells = page.locator("#routing-3 table.mlora-route-tokens td[data-experts]")
    shown = [cells.nth(k).get_attribute("data-experts") for k in range(cells.count())]
    routing = panels["mixlora_1"].routing
    by_layer = [[",".join(map(str, step.experts()[j])) for step in routing] for j in range(len(routing[0].layers))]
    assert shown == [cell for row in by_layer for cell in row]
    assert len(shown) == 2 * TOKENS
    if os.environ.get("MLORA_SCREENSHOT") == "1":
        page.locator("#status").scroll_into_view_if_needed()
        page.screenshot(path=str(ROOT / "docs" / "webui.png"), full_page=True)


def test_an_empty_instruction_gets_a_message(page):
    page.locator("#instruction textarea").fill("   ")
    page.locator("#generate").click()
    status_shows(page, "Type an instruction first", timeout=20_000)
    assert "Traceback" not in page.content()
