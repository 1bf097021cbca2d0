"""The built book in a real browser: headless Chromium (Debian's, driven by Playwright), offline.

Builds nothing. `CYTOCLR_BOOK_HTML` names a built book (default: `_build/smoke/html` under the project
root; `make test` builds it with `cytoclr book --run runs/smoke --out _build/smoke`); without one the
tests skip. Every chapter of `book/_toc.yml` must load from a local server with every image decoded, no
page or console error and no request to another host (the book must work offline); interactive 3D
views (an iframe, a nilearn or plotly view) must draw a plot of non-zero size. A full-page screenshot
of the front page goes to `CYTOCLR_SCREENSHOT_DIR` (default: the book folder's parent). A second test
greps every page for the building machine's absolute paths.

Chromium: `CYTOCLR_CHROMIUM` (default `/usr/bin/chromium`, `make browser` installs it); Playwright's
own browser download cannot work offline, so it is never used.
"""
import functools
import http.server
import os
import re
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

from cytoclr.pipeline import toc_chapters

ROOT = Path(__file__).resolve().parents[1]
BOOK = Path(os.environ.get("CYTOCLR_BOOK_HTML") or ROOT / "_build" / "smoke" / "html").resolve()
SHOTS = Path(os.environ.get("CYTOCLR_SCREENSHOT_DIR") or BOOK.parent).resolve()
CHROMIUM = os.environ.get("CYTOCLR_CHROMIUM", "/usr/bin/chromium")
# --no-sandbox: Chromium's sandbox refuses to run as root. --disable-dev-shm-usage: containers have a tiny
# /dev/shm. No GPU here: WebGL runs on SwiftShader (ANGLE's software renderer), which recent Chromium
# only allows when asked with --enable-unsafe-swiftshader (so no --disable-gpu).
CHROMIUM_ARGS = ["--disable-dev-shm-usage", "--use-angle=swiftshader", "--enable-unsafe-swiftshader"]
if os.geteuid() == 0:
    CHROMIUM_ARGS.insert(0, "--no-sandbox")
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
PAGES = toc_chapters(ROOT / "book" / "_toc.yml")
# an interactive view on a page: an iframe (nilearn's views are iframes), a plotly figure, a nilearn view
VIEW_MARKERS = re.compile(r"<iframe\b|plotly-graph-div|js-plotly-plot|Plotly\.newPlot|nilearn.{0,40}(view|plot)", re.I)
VIEW_ELEMENTS = "canvas, .js-plotly-plot, .plotly-graph-div"

pytestmark = pytest.mark.skipif(
    not (BOOK / "index.html").is_file(),
    reason=f"no built book at {BOOK}: build one with `cytoclr book --run runs/smoke --out _build/smoke` "
           "(make test does) or point CYTOCLR_BOOK_HTML at a book's html folder")


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # a browser closing a connection early is not our error
        pass


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    "The book folder over HTTP on 127.0.0.1, from a thread."
    httpd = _Server(("127.0.0.1", 0), functools.partial(_Handler, directory=str(BOOK)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the Python package playwright is not installed")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no Chromium at {CHROMIUM}: `make browser` installs Debian's chromium")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def _is_local(url: str) -> bool:
    u = urlparse(url)
    return u.scheme in ("data", "blob", "about") or (u.scheme in ("http", "https", "ws", "wss") and u.hostname in LOCAL_HOSTS)


def _check_views(page) -> tuple[int, list[str]]:
    "(number of interactive views, problems): each iframe or plotly view must draw a plot of non-zero size."
    problems, n = [], 0

    def drawn(frame, where):
        try:
            frame.wait_for_selector(VIEW_ELEMENTS, state="attached", timeout=20_000)
        except Exception:
            problems.append(f"{where}: no canvas or plotly plot appeared within 20 s")
            return
        frame.wait_for_timeout(500)  # let the view lay itself out
        sizes = frame.eval_on_selector_all(
            VIEW_ELEMENTS, "els => els.map(e => [e.getBoundingClientRect().width, e.getBoundingClientRect().height])")
        if not any(w > 0 and h > 0 for w, h in sizes):
            problems.append(f"{where}: its canvas/plot has zero size {sizes}")
        text = frame.evaluate("document.body ? document.body.innerText : ''").lower()
        if "webgl is not supported" in text or "webgl not supported" in text:
            problems.append(f"{where}: says WebGL is not supported")

    for i, el in enumerate(page.query_selector_all("iframe")):
        n += 1
        el.scroll_into_view_if_needed()
        box = el.bounding_box()
        if not box or box["width"] == 0 or box["height"] == 0:
            problems.append(f"iframe {i}: zero size ({box})")
        frame = el.content_frame()
        if frame is None:
            problems.append(f"iframe {i}: has no document")
            continue
        drawn(frame, f"iframe {i}")
    if page.query_selector(".js-plotly-plot, .plotly-graph-div"):
        n += 1
        drawn(page.main_frame, "plotly view")
    return n, problems


def visit(browser, url: str, screenshot: Path | None = None) -> dict:
    "Open `url`; return its problems, requests, number of images and views, and the seconds it took."
    t0 = time.perf_counter()
    ctx = browser.new_context(viewport={"width": 1280, "height": 900}, service_workers="block")
    page = ctx.new_page()
    problems, requests, external = [], [], []

    def route(r):
        if _is_local(r.request.url):
            r.continue_()
        else:  # never wait for a network that is not there: the book must not need it
            external.append(r.request.url)
            r.abort()

    ctx.route("**/*", route)
    page.on("request", lambda r: requests.append(r.url))
    page.on("websocket", lambda ws: _is_local(ws.url) or external.append(ws.url))
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("console", lambda m: m.type == "error" and problems.append(
        f"console error: {m.text} ({m.location.get('url', '')}:{m.location.get('lineNumber', '')})"))
    page.on("response", lambda r: r.status >= 400 and problems.append(f"HTTP {r.status} for {r.url}"))
    page.on("requestfailed", lambda r: _is_local(r.url) and problems.append(f"request failed: {r.url} ({r.failure})"))
    try:
        page.goto(url, wait_until="load", timeout=60_000)
        # images below the fold with loading=lazy would wait for a scroll: load them all now
        page.evaluate("document.querySelectorAll('img[loading=lazy]').forEach(i => i.loading = 'eager')")
        try:
            page.wait_for_function("Array.from(document.images).every(i => i.complete)", timeout=30_000)
        except Exception:
            pass  # reported below, image by image
        try:
            page.wait_for_load_state("networkidle", timeout=10_000)
        except Exception:
            pass
        bad = page.evaluate("Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0))"
                            ".map(i => i.getAttribute('src') || i.currentSrc)")
        problems += [f"image not loaded: {src}" for src in bad]
        n_images = page.evaluate("document.images.length")
        n_views, view_problems = 0, []
        if VIEW_MARKERS.search(page.content()):
            n_views, view_problems = _check_views(page)
            if n_views == 0:
                view_problems.append("the page mentions an interactive view (iframe/plotly/nilearn) but none is on it")
        problems += view_problems
        if screenshot is not None:
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=True)
    finally:
        ctx.close()
    problems += [f"request to another host (the book must work offline): {u}" for u in dict.fromkeys(external)]
    return dict(problems=problems, requests=requests, images=n_images, views=n_views,
                seconds=time.perf_counter() - t0)


_seen_views = {}


@pytest.mark.parametrize("stem", PAGES)
def test_page_works_offline_in_chromium(browser, server, stem):
    shot = SHOTS / "book_front_page.png" if stem == PAGES[0] else None
    r = visit(browser, f"{server}/{stem}.html", screenshot=shot)
    _seen_views[stem] = r["views"]
    print(f"{stem}: {r['images']} images, {r['views']} interactive views, {len(r['requests'])} requests, "
          f"{r['seconds']:.1f} s" + (f"; screenshot {shot}" if shot else ""))
    assert r["requests"], f"{stem}.html: the browser made no request at all"
    assert not r["problems"], f"{stem}.html:\n  " + "\n  ".join(r["problems"])
    if shot is not None:
        assert shot.stat().st_size > 10_000, f"the front page's screenshot {shot} looks empty"


def test_interactive_views_render_or_are_noted():
    "Views are checked page by page above; say so when the book has none yet (a later chapter adds one)."
    with_views = [s for s in PAGES if VIEW_MARKERS.search((BOOK / f"{s}.html").read_text(errors="replace"))]
    if not with_views:
        print("no page embeds an interactive 3D view yet (iframe, nilearn or plotly): nothing to render-check")
        return
    print(f"pages with interactive views: {with_views} (views found: {[_seen_views.get(s) for s in with_views]})")
    assert all(_seen_views.get(s, 1) > 0 for s in with_views), "a page mentions an interactive view but shows none"


def _whole_path(p: str) -> re.Pattern:
    "`p` as a whole path: not the tail of a longer name, not the head of a longer folder name."
    return re.compile(r"(?<![\w.-])" + re.escape(p.rstrip("/")) + r"(?![\w-]|\.\w)")


def _is_run_folder(p: Path) -> bool:
    return any((p / f).exists() for f in ("pipeline_state.json", "metrics.json"))


def test_no_page_names_the_machines_paths():
    forbidden = {}
    for p, what in ((ROOT, "the project root"), (ROOT.resolve(), "the project root"),
                    (Path.home(), "the home folder"), (Path.home().resolve(), "the home folder"),
                    (BOOK.parent, "the book's build folder")):
        if len(str(p)) > 1:
            forbidden.setdefault(str(p), what)
    tmp = re.compile(re.escape(tempfile.gettempdir().rstrip("/")) + r"/[\w.-]+")
    failures = []
    pages = sorted(BOOK.rglob("*.html"))
    assert pages, f"no .html file under {BOOK}"
    for f in pages:
        text = f.read_text(errors="replace")
        for p, what in forbidden.items():
            if _whole_path(p).search(text):
                failures.append(f"{f.relative_to(BOOK)} names {what} {p}")
        for m in sorted(set(tmp.findall(text))):
            if _is_run_folder(Path(m)):
                failures.append(f"{f.relative_to(BOOK)} names the run folder {m}")
    assert not failures, "pages name the building machine's paths:\n  " + "\n  ".join(failures)
