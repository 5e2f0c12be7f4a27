"""The studio page in Debian's headless chromium, driven by Selenium: launch a tiny pretraining run from the form
(built from the CLI's flags), watch its curve grow, stop it (SIGINT: a resumable checkpoint), resume it, and overlay
it with a finished run."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time

import pytest

TOKEN = "browser-token"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def studio_url(workspace, parsers, tmp_path):
    uvicorn = pytest.importorskip("uvicorn")
    from lmforge.studio.app import Studio, create_studio_app

    root = tmp_path / "ws"
    shutil.copytree(workspace / "tokens", root / "tokens")
    shutil.copytree(workspace / "runs" / "pt-done", root / "runs" / "pt-done")
    port = _free_port()
    studio = Studio(root / "runs", parsers, cwd=root)
    uv = uvicorn.Server(uvicorn.Config(create_studio_app(studio, host="127.0.0.1", port=port, token=TOKEN),
                                       host="127.0.0.1", port=port, log_level="warning", log_config=None))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if uv.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", root, studio
    for launch in studio.launcher.all():  # never leave a training process behind
        if launch.state == "running":
            studio.launcher.stop(launch.id)
    uv.should_exit = True
    thread.join(10)


def _driver():
    webdriver = pytest.importorskip("selenium.webdriver")
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("chromium and chromedriver are not installed (Debian: apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1500,1000"):
        options.add_argument(flag)
    return webdriver.Chrome(service=webdriver.ChromeService(executable_path=shutil.which("chromedriver")),
                            options=options)


def _status(driver, run_id: str) -> str:
    """The run's status as its row shows it (read in the page: the table is redrawn while the test reads)."""
    return driver.execute_script(
        "const e = document.querySelector(`#runs-table tr[data-id=\"${arguments[0]}\"] .status`);"
        "return e ? e.textContent : '';", run_id)


def _points(driver, run_id: str) -> int:
    """The number of points the chart holds for the run (its legend entry says it)."""
    texts = driver.execute_script("return [...document.querySelectorAll('#legend span')].map(s => s.textContent);")
    for text in texts:
        name, _, count = text.rpartition(" (")
        if name == run_id:
            return int(count.rstrip(")"))
    return 0


def _click(driver, selector: str) -> None:
    """Click what the selector names now (a redraw between finding and clicking would leave a stale element)."""
    driver.execute_script("document.querySelector(arguments[0]).click();", selector)


@pytest.mark.slow
def test_launch_watch_stop_resume_and_overlay_in_chromium(studio_url):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    url, root, studio = studio_url
    driver = _driver()
    try:
        driver.get(url + f"/#token={TOKEN}")
        driver.find_element(By.ID, "tab-launch").click()
        WebDriverWait(driver, 20).until(lambda d: d.find_elements(By.ID, "opt-max_steps"))
        Select(driver.find_element(By.ID, "command")).select_by_visible_text("pretrain")
        WebDriverWait(driver, 10).until(lambda d: d.find_elements(By.ID, "opt-max_steps"))
        for dest, value in (("data", "tokens"), ("out", "runs/live"), ("max_steps", "100000"), ("max_length", "16"),
                            ("batch_size", "2"), ("eval_every", "0"), ("warmup_steps", "1")):
            driver.find_element(By.ID, f"opt-{dest}").send_keys(value)
        Select(driver.find_element(By.ID, "opt-progress")).select_by_value("false")
        # the exact command, before anything starts
        want = ("lmforge pretrain --data tokens --out runs/live --max-length 16 --batch-size 2 --max-steps 100000 "
                "--warmup-steps 1 --eval-every 0 --no-progress")
        WebDriverWait(driver, 10).until(lambda d: d.find_element(By.ID, "preview").text == want)
        driver.find_element(By.ID, "start").click()
        WebDriverWait(driver, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".launch button.stop"))
        # the log streams to the page
        WebDriverWait(driver, 60).until(lambda d: "parameters" in d.find_element(By.ID, "log").text)

        driver.find_element(By.ID, "tab-runs").click()
        WebDriverWait(driver, 60).until(lambda d: _points(d, "live") >= 3)
        seen = _points(driver, "live")
        WebDriverWait(driver, 60).until(lambda d: _points(d, "live") > seen)  # the curve grows as the run trains
        assert _status(driver, "live") == "running"

        driver.find_element(By.ID, "tab-launch").click()
        _click(driver, ".launch button.stop")
        driver.find_element(By.ID, "tab-runs").click()
        WebDriverWait(driver, 60).until(lambda d: _status(d, "live") == "stopped")
        status = json.loads((root / "runs" / "live" / "status.json").read_text())
        assert status["state"] == "stopped" and status["reason"] == "SIGINT"
        stopped_at = status["step"]
        assert json.loads((root / "runs" / "live" / "latest.json").read_text())["step"] == stopped_at  # resumable

        driver.find_element(By.ID, "tab-launch").click()
        WebDriverWait(driver, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".launch button.resume"))
        _click(driver, ".launch button.resume")
        WebDriverWait(driver, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".launch button.stop"))
        driver.find_element(By.ID, "tab-runs").click()
        WebDriverWait(driver, 60).until(lambda d: _points(d, "live") > stopped_at + 2)
        resumed = studio.launcher.all()[0]
        assert resumed.argv[-1] == "--resume" and resumed.argv[:-1] == studio.launcher.all()[1].argv
        studio.launcher.stop(resumed.id)
        WebDriverWait(driver, 60).until(lambda d: _status(d, "live") == "stopped")
        steps = [json.loads(line)["step"] for line in (root / "runs" / "live" / "metrics.jsonl").read_text().splitlines()]
        assert steps == sorted(steps) and len(steps) == len(set(steps))  # resume continued, no step repeated

        # overlay: tick the finished run too; both curves are drawn
        if not driver.execute_script('return document.querySelector(\'input.overlay[data-id="pt-done"]\').checked'):
            _click(driver, 'input.overlay[data-id="pt-done"]')
        WebDriverWait(driver, 10).until(lambda d: _points(d, "pt-done") == 4 and _points(d, "live") > stopped_at)
        _click(driver, '#runs-table tr[data-id="pt-done"] td:nth-child(2)')
        assert driver.find_element(By.ID, "detail-command").text.startswith("lmforge pretrain ")
        assert not driver.find_element(By.ID, "notice").text
    finally:
        driver.quit()


@pytest.mark.slow
def test_data_preview_with_masks_and_chat_ab_in_chromium(workspace, parsers):
    """The Data view highlights what the loss trains on (Chinese included); Chat A/B puts one message to two
    checkpoints and shows each reply, the one the engine gives for that conversation."""
    uvicorn = pytest.importorskip("uvicorn")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from lmforge.studio.app import Studio, create_studio_app
    from lmforge.studio.chat import Checkpoints

    port = _free_port()
    studio = Studio(workspace / "runs", parsers, cwd=workspace)
    uv = uvicorn.Server(uvicorn.Config(create_studio_app(studio, port=port, token=TOKEN), host="127.0.0.1", port=port,
                                       log_level="warning", log_config=None))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.05)
    driver = _driver()
    try:
        driver.get(f"http://127.0.0.1:{port}/#token={TOKEN}")
        driver.find_element(By.ID, "tab-data").click()
        driver.find_element(By.ID, "data-path").send_keys("qa.jsonl")
        driver.find_element(By.ID, "data-tokenizer").send_keys("model")
        WebDriverWait(driver, 20).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#data-template option"))
        Select(driver.find_element(By.ID, "data-template")).select_by_visible_text("chatml")
        driver.find_element(By.ID, "data-show").click()
        WebDriverWait(driver, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#data-examples .example")) == 10)
        first = driver.find_elements(By.CSS_SELECTOR, "#data-examples .example")[0]
        marked = [m.text for m in first.find_elements(By.TAG_NAME, "mark")]
        assert marked == ["北京是中国的首都。<|im_end|>"]  # the reply and its end of turn, nothing of the prompt
        assert "北京是哪个国家的首都？" in first.text and "tokens" in first.text

        driver.find_element(By.ID, "tab-chat").click()
        driver.find_element(By.ID, "chat-a").send_keys("model")
        driver.find_element(By.ID, "chat-b").send_keys("runs/pt-done/last")
        driver.find_element(By.ID, "chat-max").clear()
        driver.find_element(By.ID, "chat-max").send_keys("10")
        driver.find_element(By.ID, "chat-input").send_keys("上海在哪里？")
        driver.find_element(By.ID, "chat-send").click()
        # loading two models on a busy machine can take a while: wait for the replies or the page's error line
        WebDriverWait(driver, 240).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#side-b .msg.assistant")
                                         or "error" in d.find_element(By.ID, "chat-status").get_attribute("class"))
        assert not driver.find_element(By.ID, "chat-status").text
        shown = driver.execute_script("return window.studio.chat;")
        want = Checkpoints().reply([workspace / "model", workspace / "runs" / "pt-done" / "last"],
                                   [[{"role": "user", "content": "上海在哪里？"}]] * 2, max_tokens=10)
        assert [shown["a"][1]["content"], shown["b"][1]["content"]] == [w["text"] for w in want]
        assert shown["a"][0] == {"role": "user", "content": "上海在哪里？"}
        assert "tokens in" in driver.find_element(By.CSS_SELECTOR, "#side-a .msg.assistant .meta").text
    finally:
        driver.quit()
        uv.should_exit = True
        thread.join(10)
