"""The chat page of ``ember serve`` (``ember/server/ui.py``, ``ember/server/static/``).

Plain HTTP checks (the page, its Content-Security-Policy, ``--no-ui``, the files in a built wheel),
then one end-to-end run in a real headless Chromium (Debian's ``chromium`` + ``chromium-driver``,
driven by selenium) against a real ``ember serve`` subprocess of a tiny random Llama with an API key.
The browser test is skipped, saying what to install, where no browser is installed; ``scripts/test``
installs it when run as root on Debian. Screenshots go to ``$EMBER_TEST_ARTIFACTS`` (else tmp_path).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi.testclient import TestClient

import ember
from ember.server.app import ServerSettings, create_app
from ember.server.ui import CSP, static_files

from conftest import save_word_tokenizer

ROOT = Path(__file__).resolve().parents[1]
STATIC = ROOT / "ember" / "server" / "static"
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
KEY = "sekret"
MODEL = "tiny"


@pytest.fixture(scope="module")
def model_dir(hf_checkpoint, tmp_path_factory) -> Path:
    """A tiny random Llama with a long context (a long answer to stop) and a word tokenizer with a chat template."""
    src, _ = hf_checkpoint("llama", max_position_embeddings=8192)
    folder = tmp_path_factory.mktemp("webui-model")
    for f in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(src / f, folder / f)
    save_word_tokenizer(folder, chat_template=TEMPLATE)
    return folder


@pytest.fixture(scope="module")
def engine(model_dir):
    return ember.load(model_dir, device="cpu", dtype="fp32")


# ----------------------------------------------------------------------------- plain HTTP


def test_page_is_served_with_a_csp_and_needs_no_key(engine):
    app = create_app(engine, ServerSettings(model_name=MODEL, api_key=KEY, num_blocks=64))
    c = TestClient(app)  # no lifespan: the scheduler does not run, the page needs none
    r = c.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert csp == CSP and "default-src 'self'" in csp and "connect-src 'self'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assert '<script type="module" src="/ui/chat.js">' in r.text
    for name in ("chat.js", "markdown.js", "highlight.js", "style.css"):
        f = c.get(f"/ui/{name}")
        assert f.status_code == 200 and f.headers["content-security-policy"] == CSP
        assert f.content == (STATIC / name).read_bytes()
    assert c.get("/ui/chat.js").headers["content-type"].startswith("text/javascript")
    assert c.head("/").status_code == 200 and c.head("/").content == b""
    assert c.get("/ui/nothing.js").status_code == 404
    assert c.get("/ui/static/chat.js").status_code == 404  # files by name only, from memory: no paths
    assert c.post("/").status_code == 405
    # the API itself still needs the key
    assert c.get("/v1/models").status_code == 401
    assert c.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"][0]["id"] == MODEL


def test_no_ui_gives_404(engine, tmp_path):
    from ember.commands.serve import add_parser, server_settings

    import argparse

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", str(tmp_path), "--no-ui"])  # an existing path: no name lookup
    assert server_settings(args).ui is False
    assert server_settings(parser.parse_args(["serve", str(tmp_path)])).ui is True
    c = TestClient(create_app(engine, ServerSettings(model_name=MODEL, num_blocks=64, ui=False)))
    r = c.get("/")
    assert r.status_code == 404 and "content-security-policy" not in r.headers
    assert c.get("/ui/chat.js").status_code == 404
    assert c.get("/v1/models").status_code == 200


def test_page_files_are_self_contained():
    """Every file the page names is shipped; no inline script or style, no URL of another origin."""
    files = static_files()
    html = files["index.html"].decode()
    refs = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert refs and all(r.startswith("/ui/") and r[4:] in files for r in refs), refs
    assert not re.search(r"<script(?![^>]*\bsrc=)", html), "inline <script> (the CSP forbids it)"
    assert not re.search(r"\sstyle=|\son\w+=", html), "inline style or event handler attribute"
    for name, data in files.items():
        text = data.decode()
        assert not re.search(r"(?:src|href|url)\s*[=(]\s*['\"]?(?:https?:)?//", text), f"{name} loads from elsewhere"
        if name.endswith((".js", ".css")):
            assert text.count("\n") <= 600, f"{name} has {text.count(chr(10))} lines"
    for m in re.finditer(r"from '\./([\w.]+)'", "".join(d.decode() for n, d in files.items() if n.endswith(".js"))):
        assert m.group(1) in files, f"imported module {m.group(1)} is not shipped"


def test_static_files_are_in_the_built_wheel(tmp_path):
    """The wheel setuptools builds from pyproject.toml carries every file of ember/server/static."""
    src = tmp_path / "src"
    src.mkdir()
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / f, src / f)
    shutil.copytree(ROOT / "ember", src / "ember", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    out = tmp_path / "dist"
    code = f"from setuptools import build_meta; print(build_meta.build_wheel({str(out)!r}))"
    done = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    wheel = out / done.stdout.strip().splitlines()[-1]
    names = set(zipfile.ZipFile(wheel).namelist())
    want = {f"ember/server/static/{p.name}" for p in STATIC.iterdir() if p.is_file()}
    assert want and want <= names, sorted(want - names)
    assert "ember/server/ui.py" in names


# ----------------------------------------------------------------------------- the browser


def _browser() -> tuple[str, str]:
    """Paths of a Chromium and its chromedriver, or skip saying what to install."""
    browser = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver")
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.skip("the browser test needs selenium: pip install selenium (in the test extras)")
    if not browser or not driver:
        pytest.skip("no headless Chromium: install Debian's chromium and chromium-driver "
                    "(apt-get install chromium chromium-driver; scripts/test does so when run as root)")
    return browser, driver


@pytest.fixture(scope="module")
def server(model_dir):
    """``python -m ember.server MODEL --api-key sekret`` on a free loopback port; yields its base URL."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "ember.server", str(model_dir), "--port", "0", "--dtype", "fp32",
                             "--model-name", MODEL, "--api-key", KEY, "--max-batch", "2", "--kv-blocks", "1100",
                             "--log-level", "warning"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        base = None
        deadline = time.time() + 120
        while base is None and time.time() < deadline:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "server exited before listening"
            if m := re.search(r"chat page at (http://127\.0\.0\.1:\d+)/", line):
                base = m.group(1)
        assert base, "server did not report its chat page"
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        proc.stderr.close()


def _health(base: str) -> dict:
    return httpx.get(f"{base}/health", headers={"Authorization": f"Bearer {KEY}"}).json()


def _wait(what: str, fn, timeout: float = 60.0, every: float = 0.05):
    """Poll ``fn`` until it returns something truthy; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.time() + timeout
    while True:
        got = fn()
        if got:
            return got
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


@pytest.fixture
def browser(tmp_path):
    chromium, chromedriver = _browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-dev-shm-usage", f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}", "--window-size=1280,860"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(service=Service(chromedriver), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def _artifacts(tmp_path: Path) -> Path:
    out = Path(os.environ.get("EMBER_TEST_ARTIFACTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    return out


# What the page shows, read in one call: the messages (role, text, stats line, stopped) and the buttons.
STATE_JS = """
const msgs = [...document.querySelectorAll('#messages .msg')].map((m) => ({
  role: m.classList.contains('user') ? 'user' : 'assistant',
  text: m.querySelector('.body') ? m.querySelector('.body').textContent : '',
  error: m.querySelector('.error') && !m.querySelector('.error').hidden ? m.querySelector('.error').textContent : '',
  stats: m.querySelector('.stats') ? m.querySelector('.stats').textContent : '',
  streaming: m.classList.contains('streaming'),
}));
return {msgs, busy: !document.getElementById('stop').hidden,
        convs: [...document.querySelectorAll('#conversations .conv .title')].map((t) => t.textContent),
        keyOpen: document.getElementById('key-dialog').open,
        keyError: document.getElementById('key-error').hidden ? '' : document.getElementById('key-error').textContent,
        model: document.getElementById('model').value};
"""

# A stored conversation with what a real model writes: Markdown, code, reasoning, and HTML that must stay text.
SAMPLE = {"id": "cmarkdown", "title": "Markdown and code", "created": 1, "updated": 4102444800000, "messages": [
    {"role": "user", "content": "Show me a Python function <script>window.__pwned = 1</script>"},
    {"role": "assistant", "reasoning": "The user wants a short example.\nA loop is clearer than recursion here.",
     "content": "Here is **one**, with `a, b` swapped each step:\n\n```python\ndef fib(n: int) -> int:\n"
                "    \"\"\"The n-th Fibonacci number.\"\"\"\n    a, b = 0, 1  # F(0), F(1)\n"
                "    for _ in range(n):\n        a, b = b, a + b\n    return a\n```\n\n"
                "- it runs in *O(n)* time\n- <img src=x onerror=\"window.__pwned = 1\"> stays text\n"
                "  1. nested\n  2. list\n\n| n | fib(n) |\n|---|---:|\n| 10 | 55 |\n\n"
                "> See [the docs](https://docs.python.org/3/), [Fibonacci](https://en.wikipedia.org/wiki/Fib_(n)) "
                "or [this](javascript:alert(1)).",
     "stats": {"model": "tiny", "promptTokens": 21, "completionTokens": 96, "tokensPerSecond": 41.5,
               "firstTokenSeconds": 0.08, "seconds": 2.4, "context": 8192}}]}


# Renders each case with the page's own markdown.js; returns the HTML it built.
MARKDOWN_JS = """
const [cases, done] = arguments;
import('/ui/markdown.js').then((md) => done(cases.map((text) => {
  const box = document.createElement('div');
  box.append(md.renderMarkdown(text));
  return box.innerHTML;
})), (e) => done(String(e)));
"""
MARKDOWN_CASES = ["```js\nconst x = 1;", "## Title\n\ntext\nnext line\n\n---\n\n> quote\n> more",
                  "*b* _c_ ~~d~~ snake_case_name 2 * 3 * 4 `<b>`", "<b onclick=\"x()\">bold?</b> &lt;",
                  "3. three\n4. four\n   - sub"]


def _settings(d, **fields) -> None:
    from selenium.webdriver.common.by import By

    if not d.find_element(By.ID, "settings").is_displayed():
        d.find_element(By.ID, "open-settings").click()
    for name, value in fields.items():
        box = d.find_element(By.ID, name)
        box.clear()
        box.send_keys(str(value))
    d.find_element(By.ID, "close-settings").click()


def _send(d, text: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = d.find_element(By.ID, "input")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def _answer(d, count: int, timeout: float = 120.0) -> dict:
    """The page state once `count` messages are shown and none streams."""
    state = lambda: d.execute_script(STATE_JS)  # noqa: E731
    return _wait(f"{count} messages, none streaming",
                 lambda: (s := state()) and len(s["msgs"]) == count and not s["busy"] and s, timeout)


def _reference(base: str, text: str, max_tokens: int) -> str:
    """The server's greedy answer to `text` over the plain API (what the page must show)."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "temperature": 0, "top_p": 1,
            "max_tokens": max_tokens}
    r = httpx.post(f"{base}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    return r.json()["choices"][0]["message"]["content"]


def test_chat_page_in_chromium(browser, server, tmp_path):  # browser first: skips before the server starts
    from selenium.webdriver.common.by import By

    d, base = browser, server
    state = lambda: d.execute_script(STATE_JS)  # noqa: E731
    d.get(f"{base}/")

    # --- the API key: asked for once, a wrong one is refused with an error, the right one lists the model
    _wait("the API-key dialog", lambda: state()["keyOpen"])
    assert state()["keyError"] == ""
    d.find_element(By.ID, "key-input").send_keys("wrong")
    d.find_element(By.ID, "key-submit").click()
    err = _wait("the wrong-key error", lambda: state()["keyError"])
    assert "refused" in err and "401" in err and state()["keyOpen"] and state()["model"] == ""
    d.find_element(By.ID, "key-input").send_keys(KEY)
    d.find_element(By.ID, "key-submit").click()
    _wait("the model list", lambda: (s := state())["model"] == MODEL and not s["keyOpen"])
    assert "8192" in d.find_element(By.ID, "model-info").text

    # --- a message gets a streamed answer equal to the server's greedy answer, with its figures
    _settings(d, temperature=0, max_tokens=6)
    _send(d, "hello there")
    s = _answer(d, 2)
    want = _reference(base, "hello there", 6)
    assert want and s["msgs"][0]["text"] == "hello there" and s["msgs"][1]["text"] == want, s
    assert re.search(r"6 tokens · [\d.]+ tok/s · first token [\d.]+ s · context \d+/8192", s["msgs"][1]["stats"]), s

    # --- bad settings are named and nothing is sent; the typed message stays
    _settings(d, extra='{"ignore_eos": tru')
    _send(d, "not sent")
    _wait("the settings error", lambda: "extra request fields" in d.find_element(By.ID, "banner").text)
    assert len(state()["msgs"]) == 2 and d.find_element(By.ID, "input").get_attribute("value") == "not sent"
    d.find_element(By.ID, "input").clear()

    # --- a long answer streams (its text grows) and Stop ends it; the server cancels the sequence
    d.find_element(By.ID, "new-chat").click()
    _settings(d, max_tokens=8000, extra='{"ignore_eos": true}')
    cancelled = _health(base)["cancelled"]
    _send(d, "tell me a long story")
    words = lambda: len(state()["msgs"][-1]["text"].split()) if len(state()["msgs"]) == 2 else 0  # noqa: E731
    first = _wait("the answer to start", lambda: words() >= 2 and words())
    _wait("the answer to grow", lambda: words() > first)
    h = _health(base)
    assert state()["busy"] and h["running"] == 1 and h["kv_blocks_free"] < h["kv_blocks_total"], h
    d.find_element(By.ID, "stop").click()
    s = _answer(d, 2, timeout=30)
    assert s["msgs"][1]["stats"].startswith("stopped"), s["msgs"][1]
    h = _wait("the server to free the stopped sequence",
              lambda: (h := _health(base)) and h["running"] == 0 and h["kv_blocks_free"] == h["kv_blocks_total"] and h,
              timeout=30)
    assert h["cancelled"] == cancelled + 1 and h["waiting"] == 0
    stopped = state()["msgs"][1]["text"]
    d.save_screenshot(str(_artifacts(tmp_path) / "webui-stopped.png"))
    time.sleep(0.5)
    assert state()["msgs"][1]["text"] == stopped and 2 <= len(stopped.split()) < 8000

    # --- regenerate replaces the stopped answer with a finished one
    _settings(d, max_tokens=6, extra="")
    d.find_element(By.CSS_SELECTOR, "#messages .msg.assistant .regenerate").click()
    s = _answer(d, 2)
    assert s["msgs"][1]["text"] == _reference(base, "tell me a long story", 6) and "6 tokens" in s["msgs"][1]["stats"]

    # --- reload: the key is remembered for the tab, both conversations are there and open as they were
    before = state()
    d.refresh()
    _wait("the page after a reload", lambda: (s := state())["model"] == MODEL and len(s["convs"]) == 2)
    assert not state()["keyOpen"] and sorted(state()["convs"]) == ["hello there", "tell me a long story"]
    assert state()["msgs"] == before["msgs"]
    d.find_element(By.XPATH, "//*[@id='conversations']//span[text()='hello there']").click()
    s = state()
    assert [m["text"] for m in s["msgs"]] == ["hello there", want]

    # --- edit and resend: the edited question gets a new answer, later messages are replaced
    d.find_element(By.CSS_SELECTOR, "#messages .msg.user .edit-button").click()
    area = d.find_element(By.CSS_SELECTOR, "#messages .msg.user .edit textarea")
    area.clear()
    area.send_keys("tell me a long story")
    d.find_element(By.CSS_SELECTOR, "#messages .msg.user .resend").click()
    s = _answer(d, 2)
    assert [m["text"] for m in s["msgs"]] == ["tell me a long story", _reference(base, "tell me a long story", 6)]

    # --- Markdown, code highlighting, reasoning and HTML-as-text, in a stored conversation; screenshots
    d.execute_script("const c = JSON.parse(localStorage.getItem('ember.conversations'));"
                     "c.push(arguments[0]); localStorage.setItem('ember.conversations', JSON.stringify(c));", SAMPLE)
    d.refresh()
    _wait("the stored conversation", lambda: len(state()["msgs"]) == 2 and state()["convs"][0] == SAMPLE["title"])
    md = d.find_element(By.CSS_SELECTOR, "#messages .msg.assistant .body")
    assert [e.text for e in md.find_elements(By.CSS_SELECTOR, "code .tok-kw")][:3] == ["def", "for", "in"]
    assert "# F(0), F(1)" in [e.text for e in md.find_elements(By.CSS_SELECTOR, "code .tok-com")]
    assert md.find_element(By.CSS_SELECTOR, "strong").text == "one"
    assert md.find_element(By.CSS_SELECTOR, "td[align=right]").text == "55"
    links = [(a.text, a.get_attribute("href")) for a in md.find_elements(By.TAG_NAME, "a")]
    assert links == [("the docs", "https://docs.python.org/3/"), ("Fibonacci", "https://en.wikipedia.org/wiki/Fib_(n)")]
    assert md.text.rstrip().endswith("or this.")  # a javascript: link is shown as its text only
    assert md.find_elements(By.CSS_SELECTOR, "img, script") == [] and "<img src=x" in md.text
    assert "<script>" in state()["msgs"][0]["text"] and d.execute_script("return window.__pwned") is None
    reasoning = d.find_element(By.CSS_SELECTOR, "#messages details.reasoning")
    assert reasoning.get_attribute("open") is None and "Reasoning (" in reasoning.text
    reasoning.find_element(By.TAG_NAME, "summary").click()
    assert "clearer than recursion" in reasoning.text
    html = d.execute_async_script(MARKDOWN_JS, MARKDOWN_CASES)
    assert html[0] == ('<div class="codeblock"><div class="code-head"><span class="lang">js</span><button class="copy" '
                       'type="button">Copy</button></div><pre><code data-lang="js"><span class="tok-kw">const</span> '
                       'x = <span class="tok-num">1</span>;</code></pre></div>')  # an unclosed fence, still streaming
    assert html[1] == "<h2>Title</h2><p>text<br>next line</p><hr><blockquote><p>quote<br>more</p></blockquote>"
    assert html[2] == "<p><em>b</em> <em>c</em> <del>d</del> snake_case_name 2 * 3 * 4 <code>&lt;b&gt;</code></p>"
    assert html[3] == "<p>&lt;b onclick=\"x()\"&gt;bold?&lt;/b&gt; &amp;lt;</p>"
    assert html[4] == "<ol start=\"3\"><li>three</li><li>four<ul><li>sub</li></ul></li></ol>"
    out = _artifacts(tmp_path)
    shots = []
    d.set_window_size(1280, 1040)  # the whole stored conversation
    for theme in ("light", "dark"):
        if d.execute_script("return document.documentElement.dataset.theme") != theme:
            d.find_element(By.ID, "theme").click()
        assert d.execute_script("return document.documentElement.dataset.theme") == theme
        shots.append(out / f"webui-{theme}.png")
        assert d.save_screenshot(str(shots[-1])) and shots[-1].stat().st_size > 10_000
    print("screenshots:", *shots, out / "webui-stopped.png")
    d.refresh()  # the theme is kept
    _wait("the page after a reload", lambda: state()["model"] == MODEL)
    assert d.execute_script("return document.documentElement.dataset.theme") == "dark"

    # --- nothing but this server was asked for anything; no script error, no CSP violation
    origin = urlsplit(base)._replace(path="", query="", fragment="").geturl()
    urls = set()
    for entry in d.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"] in ("Network.requestWillBeSent", "Network.webSocketCreated"):
            urls.add(msg["params"].get("request", msg["params"]).get("url"))
    web = {u for u in urls if u and urlsplit(u).scheme in ("http", "https", "ws", "wss")}
    assert f"{origin}/v1/chat/completions" in web and f"{origin}/ui/chat.js" in web
    assert {u for u in web if not u.startswith(origin + "/")} == set()
    problems = [e["message"] for e in d.get_log("browser") if e["level"] == "SEVERE"
                and not ("/v1/models" in e["message"] and "401" in e["message"])]  # the wrong key, on purpose
    assert problems == []
