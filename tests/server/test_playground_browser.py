"""The web page in a real headless browser (Debian's Chromium through Selenium and ChromeDriver).

`make test` installs chromium and chromium-driver where it can; without them these tests skip with a message.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from serve_harness import API_KEY
from test_playground import SYSTEM, streaming_chat

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="no chromium / chromedriver (Debian packages chromium, chromium-driver)")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,900"):
        options.add_argument(argument)
    options.binary_location = CHROMIUM
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(CHROMEDRIVER))
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def open_page(browser: Any, url: str) -> None:
    browser.get(f"{url}/")
    browser.execute_script("localStorage.clear()")
    browser.get(f"{url}/")


def wait(browser: Any, condition: Any, timeout_s: float = 60) -> Any:
    return WebDriverWait(browser, timeout_s, poll_frequency=0.05).until(lambda driver: condition())


def text(browser: Any, element_id: str) -> str:
    return browser.find_element(By.ID, element_id).text


def errors(browser: Any) -> list[dict]:
    return [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]


def ask(browser: Any, prompt: str, max_tokens: int) -> Any:
    """Type a prompt and send it; the assistant's message element."""
    browser.find_element(By.CSS_SELECTOR, "#settings summary").click()
    field = browser.find_element(By.ID, "max-tokens")
    field.clear()
    field.send_keys(str(max_tokens))
    browser.find_element(By.ID, "temperature").clear()
    browser.find_element(By.ID, "temperature").send_keys("0")
    browser.find_element(By.ID, "prompt").send_keys(prompt)
    browser.find_element(By.ID, "send").click()
    return wait(browser, lambda: browser.find_elements(By.CSS_SELECTOR, ".message.assistant"))[-1]


def test_a_message_streams_while_the_kv_view_shows_its_blocks(live, browser) -> None:
    open_page(browser, live.url)
    wait(browser, lambda: text(browser, "model-name") == "smollm2")
    answer = ask(browser, "List the planets of the solar system, one per line.", 200)
    # During generation: the request's blocks are in use in the view (and its row in the block tables).
    wait(browser, lambda: int(text(browser, "kv-used")) > 0)
    assert browser.find_elements(By.CSS_SELECTOR, "#kv-requests tbody tr")
    wait(browser, lambda: answer.get_attribute("data-state") != "streaming", 120)
    assert answer.get_attribute("data-state") == "done"
    assert answer.text.strip() and "TTFT" in answer.text and "tok/s" in answer.text
    # After: every block free again (the full ones cached).
    wait(browser, lambda: int(text(browser, "kv-used")) == 0)
    assert int(text(browser, "kv-cached")) > 0
    assert browser.find_element(By.ID, "regenerate").is_enabled()
    assert errors(browser) == []


def test_stop_keeps_the_partial_answer(live, browser) -> None:
    open_page(browser, live.url)
    answer = ask(browser, "Write a long story about a lighthouse keeper.", 400)
    wait(browser, lambda: answer.text.strip())
    browser.find_element(By.ID, "stop").click()
    wait(browser, lambda: answer.get_attribute("data-state") == "stopped")
    assert "stopped" in answer.text
    wait(browser, lambda: int(text(browser, "kv-used")) == 0)  # the aborted request gave its blocks back


def test_requests_sharing_a_system_prompt_show_shared_blocks(live, browser) -> None:
    open_page(browser, live.url)
    wait(browser, lambda: text(browser, "model-name") == "smollm2")
    seen = threading.Event()
    with streaming_chat(live.url, SYSTEM, "Tell me a story."), streaming_chat(live.url, SYSTEM, "Name a color."):
        wait(browser, lambda: int(text(browser, "kv-shared")) >= 4)
        seen.set()
        browser.save_screenshot("/tmp/kvserve-playground-shared.png")
    assert seen.is_set()
    assert len(browser.find_elements(By.CSS_SELECTOR, "#kv-requests tbody tr")) in (1, 2, 0)


def test_with_an_api_key_the_page_asks_for_it(live, browser) -> None:
    open_page(browser, live.keyed_url)
    dialog = wait(browser, lambda: browser.find_element(By.ID, "key-dialog").get_attribute("open") is not None
                  and browser.find_element(By.ID, "key-dialog"))
    assert dialog.is_displayed()
    browser.find_element(By.ID, "key-input").send_keys(API_KEY)
    dialog.find_element(By.CSS_SELECTOR, "button[value=save]").click()
    wait(browser, lambda: text(browser, "model-name") == "smollm2")
    time.sleep(0.6)  # a KV poll with the key
    assert text(browser, "kv-summary").startswith(str(live.llm.engine.kv_manager.num_blocks))
    assert not [e for e in errors(browser) if "401" not in e["message"]]  # the first, keyless calls answered 401
