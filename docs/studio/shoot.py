"""Screenshots of every studio view for docs/studio.md and the README, taken from a live studio in headless chromium
so they stay current:

    python docs/studio/shoot.py     # writes docs/studio/{runs,pipeline,launch,data,evals,chat,rag}.png

It builds a small workspace in a temporary folder (a tokenizer and token shards of the built-in corpus, two short
pretraining runs with different learning rates and an evaluation of each, a data pipeline, a RAG index, an
instruction file in English and Chinese), starts the studio on
it, and drives the page as a user would. Needs Debian's chromium + chromedriver and selenium (the test extras).
A few minutes on a laptop CPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
QA = [("北京是哪个国家的首都？", "北京是中华人民共和国的首都。"), ("What does the yield statement do?",
      "It makes a function a generator: each yield hands one value to the caller and pauses there."),
      ("把这句话翻译成英文：你好，世界", "Hello, world."), ("Name a primary colour.", "Red is a primary colour.")]


def has_cjk_font() -> bool:
    """Whether chromium can draw Chinese here (fontconfig knows a font for it)."""
    import subprocess

    try:
        return bool(subprocess.run(["fc-list", ":lang=zh"], capture_output=True, text=True).stdout.strip())
    except OSError:
        return False


def build_workspace(root: Path) -> None:
    """Tokenizer, shards, two finished pretraining runs and an instruction file, made by the real CLI in `root`
    (the current directory: the paths the page shows are relative to it)."""
    import sys

    from lmforge.cli import main

    def run(*argv: str) -> None:
        if main(list(argv)) != 0:
            raise SystemExit(f"lmforge {' '.join(argv)} failed")

    run("tokenizer", "train", "--input", "builtin:python-docs", "--vocab-size", "2000", "--out", "tok")
    run("data", "tokenize", "--input", "builtin:python-docs", "--tokenizer", "tok", "--out", "tokens")
    for name, lr in (("lr-3e-3", "0.003"), ("lr-1e-2", "0.01")):
        run("pretrain", "--data", "tokens", "--out", f"runs/{name}", "--max-length", "64", "--batch-size", "8",
            "--max-steps", "60", "--eval-every", "10", "--eval-batches", "2", "--warmup-steps", "5", "--lr", lr,
            "--no-progress")
    qa = QA
    if not has_cjk_font():  # boxes instead of characters would misrepresent the page
        print("no font for Chinese here (Debian: apt-get install fonts-noto-cjk): the screenshots leave the Chinese "
              "examples out", file=sys.stderr)
        qa = [(q, a) for q, a in QA if q.isascii()]
    items = [{"q": "The keyword that defines a function in Python is", "a": "def"},
             {"q": "The statement that leaves a loop early is", "a": "break"},
             {"q": "The built-in that gives the length of a list is", "a": "len"}]
    Path("items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items), encoding="utf-8")
    Path("python.yaml").write_text("task: python\ndata: items.jsonl\noutput_type: generate_until\n"
                                   "doc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\ngeneration_kwargs:\n"
                                   "  max_gen_toks: 4\n", encoding="utf-8")
    for name in ("lr-3e-3", "lr-1e-2"):
        run("eval", "run", "--model", f"runs/{name}/best", "--task", "python.yaml", "--out", f"runs/eval-{name}",
            "--json")
    Path("pipeline.yaml").write_text("input: [builtin:python-docs]\noutput: runs/clean\nsteps:\n  - whitespace\n"
                                     "  - length: {min_chars: 2000}\n  - exact_dedup\n", encoding="utf-8")
    run("data", "run", "pipeline.yaml")
    run("rag", "index", "--input", "builtin:python-docs", "--out", "index", "--no-dense")
    rows = [{"instruction": q, "input": "", "output": a} for q, a in qa] + [{"instruction": "no answer here"}]
    (root / "qa.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def start_studio(root: Path, token: str) -> tuple[str, object]:
    import uvicorn

    from lmforge.cli import build_parser
    from lmforge.studio.app import Studio, create_studio_app
    from lmforge.studio.commands import LAUNCHABLE, subcommand_parser

    parser = build_parser()
    studio = Studio(root / "runs", {c: subcommand_parser(parser, c) for c in LAUNCHABLE}, cwd=root)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_studio_app(studio, port=port, token=token), host="127.0.0.1",
                                           port=port, log_level="warning", log_config=None))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", studio


def shoot(url: str, token: str, studio, out: Path) -> list[Path]:
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1440,900",
                 "--hide-scrollbars", "--force-device-scale-factor=1"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=shutil.which("chromedriver")),
                              options=options)
    wait = WebDriverWait(driver, 120)
    shots = []

    def click(selector: str) -> None:
        driver.execute_script("document.querySelector(arguments[0]).click();", selector)

    def save(name: str) -> None:
        driver.execute_script("window.scrollTo(0, 0);")
        path = out / f"{name}.png"
        driver.save_screenshot(str(path))
        shots.append(path)

    try:
        driver.get(f"{url}/#token={token}")
        wait.until(lambda d: d.execute_script("return document.querySelectorAll('#runs-table tbody tr').length") >= 2)
        for run in ("lr-3e-3", "lr-1e-2"):
            if not driver.execute_script(f"return document.querySelector('input.overlay[data-id=\"{run}\"]').checked"):
                click(f'input.overlay[data-id="{run}"]')
        Select(driver.find_element(By.ID, "metric")).select_by_visible_text("loss")
        click('#runs-table tr[data-id="lr-1e-2"] td:nth-child(2)')
        time.sleep(1.5)
        save("runs")

        click('#runs-table tr[data-id="clean"] td:nth-child(2)')
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#pipeline-rejects .reject-doc"))
        driver.execute_script("document.getElementById('detail').scrollIntoView();")
        time.sleep(0.5)
        path = out / "pipeline.png"
        driver.save_screenshot(str(path))
        shots.append(path)

        driver.find_element(By.ID, "tab-launch").click()
        wait.until(lambda d: d.find_elements(By.ID, "opt-max_steps"))
        for dest, value in (("data", "tokens"), ("out", "runs/live"), ("max_steps", "100000"), ("max_length", "64"),
                            ("batch_size", "8"), ("eval_every", "0")):
            driver.find_element(By.ID, f"opt-{dest}").send_keys(value)
        Select(driver.find_element(By.ID, "opt-progress")).select_by_value("false")
        wait.until(lambda d: "--out runs/live" in d.find_element(By.ID, "preview").text)
        driver.find_element(By.ID, "start").click()
        wait.until(lambda d: "parameters" in d.find_element(By.ID, "log").text)
        time.sleep(3)
        save("launch")
        for launch in studio.launcher.all():
            if launch.state == "running":
                studio.launcher.stop(launch.id)

        driver.find_element(By.ID, "tab-data").click()
        driver.find_element(By.ID, "data-path").send_keys("qa.jsonl")
        driver.find_element(By.ID, "data-tokenizer").send_keys("tok")
        Select(driver.find_element(By.ID, "data-template")).select_by_visible_text("chatml")
        driver.find_element(By.ID, "data-show").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#data-examples .example"))
        save("data")

        driver.find_element(By.ID, "tab-evals").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "input.eval-pick"))
        for box in driver.find_elements(By.CSS_SELECTOR, "input.eval-pick"):
            box.click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#eval-table td.task"))
        click("#eval-table td.task")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#eval-items .item"))
        save("evals")

        driver.find_element(By.ID, "tab-chat").click()
        driver.find_element(By.ID, "chat-a").send_keys("runs/lr-3e-3/best")
        driver.find_element(By.ID, "chat-b").send_keys("runs/lr-1e-2/best")
        driver.find_element(By.ID, "chat-max").clear()
        driver.find_element(By.ID, "chat-max").send_keys("40")
        driver.find_element(By.ID, "chat-input").send_keys("The for statement")
        driver.find_element(By.ID, "chat-send").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#side-b .msg.assistant"))
        save("chat")

        driver.find_element(By.ID, "tab-rag").click()
        driver.find_element(By.ID, "rag-index").send_keys("index")
        driver.find_element(By.ID, "rag-k").clear()
        driver.find_element(By.ID, "rag-k").send_keys("3")
        driver.find_element(By.ID, "rag-question").send_keys("How do I leave a loop early?")
        driver.find_element(By.ID, "rag-ask").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#rag-sources .source"))
        save("rag")
    finally:
        driver.quit()
    return shots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(HERE), help="where the PNGs go (default: docs/studio)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary workspace")
    args = parser.parse_args()
    import os

    root = Path(tempfile.mkdtemp(prefix="lmforge-studio-shots-"))
    out = Path(args.out).resolve()
    here = os.getcwd()
    os.chdir(root)
    try:
        build_workspace(root)
        url, studio = start_studio(root, "screenshot")
        for path in shoot(url, "screenshot", studio, out):
            print(path)
    finally:
        os.chdir(here)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
