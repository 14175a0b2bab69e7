"""The viewer in a real browser: Debian's chromium, headless, against the server on a loopback port.

Each page is loaded with scripts running (plotly draws the figures), its DOM dumped after the scripts ran,
and chromium's console log read from stderr: our pages must log nothing (no error, no CSP violation).
Screenshots go to $MECHSCOPE_TEST_ARTIFACTS (default: the test's tmp folder); with MECHSCOPE_UPDATE_DOCS=1
the screenshots also replace the ones in docs/figures/records/.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

BROWSERS = ("chromium", "chromium-headless-shell", "chromium-browser", "google-chrome")
BROWSER = next((b for b in BROWSERS if shutil.which(b)), None)
DOCS = Path(__file__).resolve().parents[2] / "docs" / "figures" / "records"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        BROWSER is None,
        reason="no chromium on PATH (./run test installs Debian's chromium-headless-shell when run as root; "
        "or: apt-get install chromium-headless-shell)",
    ),
]


def _chromium(args: list[str], profile: Path, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    command = [
        str(BROWSER),
        "--headless",
        "--no-sandbox",  # root in CI containers
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=15000",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)


def _console(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Content Security Policy" in line]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("MECHSCOPE_TEST_ARTIFACTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def dom(tmp_path):
    def load(url: str) -> str:
        done = _chromium(["--dump-dom", url], tmp_path / "profile")
        assert done.returncode == 0, done.stderr[-2000:]
        assert _console(done.stderr) == [], _console(done.stderr)
        return done.stdout

    return load


def _screenshot(url: str, path: Path, profile: Path, height: int = 1400) -> None:
    done = _chromium(["--hide-scrollbars", f"--window-size=1280,{height}", f"--screenshot={path}", url], profile)
    assert done.returncode == 0 and path.is_file() and path.stat().st_size > 10_000, done.stderr[-2000:]
    assert _console(done.stderr) == []
    if os.environ.get("MECHSCOPE_UPDATE_DOCS") == "1":
        DOCS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, DOCS / path.name)


def _row_ids(page: str) -> list[str]:
    return re.findall(r'<a class="run-link" href="/runs/([^"]+)">', page)


def test_the_run_list_renders_the_runs_and_filtering_works(server, store, dom, artifacts, tmp_path):
    page = dom(server + "/")
    assert set(_row_ids(page)) == {store.lens, store.heads, store.heads2, store.missing}
    assert '<p class="count" id="run-count">4 of 4 runs</p>' in page
    assert "<title>mechscope runs</title>" in page  # no injected script ran (it would set the title)
    assert "&lt;script&gt;document.title=" in page  # the hostile name shows as text
    page = dom(server + "/?tag=heads")
    assert _row_ids(page) == [store.heads2, store.heads] and "2 of 4 runs" in page
    assert '<option value="heads" selected="">heads</option>' in page  # the form keeps the filter
    page = dom(server + "/?q=lost&status=finished")
    assert _row_ids(page) == [store.missing]
    _screenshot(server + "/", artifacts / "viewer-list.png", tmp_path / "p2", height=700)


def test_a_run_page_draws_its_figures_and_escapes_its_strings(server, store, dom, artifacts, tmp_path):
    page = dom(server + f"/runs/{store.lens}")
    assert "<title>lens &lt;script&gt;document.title='pwned'&lt;/script&gt;" in page  # title intact: no script ran
    assert "<img src=" not in page  # the onerror image is text, not an element
    figures = re.findall(r'<div class="figure[^"]*" id="(fig-[^"]+)"[^>]*data-drawn="(\d+)"', page)
    assert len(figures) >= 3 and all(int(n) > 0 for _, n in figures)  # plotly drew each figure's traces
    assert page.count('class="main-svg"') >= 3  # ...as SVG
    assert 'data-figures-drawn="' in page
    page = dom(server + f"/runs/{store.missing}")
    assert "missing file artifacts/" in page
    page = dom(server + f"/runs/{store.heads}?tensor=head_detectors:previous_token")
    assert re.search(r'id="fig-0"[^>]*data-drawn="1"', page)  # the head scores heatmap, of the chosen tensor
    assert "<strong>previous_token</strong>" in page and "head_detectors: previous_token" in page
    _screenshot(server + f"/runs/{store.heads}", artifacts / "viewer-run.png", tmp_path / "p2", height=1900)


def test_the_comparison_page_shows_both_runs_metrics_and_overlaid_figures(server, store, dom, artifacts, tmp_path):
    page = dom(server + f"/compare?id={store.lens}&id={store.heads}")
    table = page.split('class="compare-metrics"')[1].split("</table>")[0]
    assert store.lens in table and store.heads in table
    row = re.search(r"<td>final_kl</td>(.*?)</tr>", table, re.S)
    assert row is not None and len(re.findall(r"<td>([^<]+)</td>", row.group(1))) == 2  # a value per run
    assert "<td>0.5</td>" in row.group(1)
    assert re.search(r'id="fig-metrics"[^>]*data-drawn="2"', page)  # grouped bars: one trace per run
    # two runs of the same method: their head-score heatmaps side by side
    url = server + f"/compare?id={store.heads}&id={store.heads2}"
    page = dom(url)
    assert "head_detectors (side by side)" in page
    assert len(re.findall(r'id="fig-side-0-\d"[^>]*data-drawn="1"', page)) == 2
    _screenshot(url, artifacts / "viewer-compare.png", tmp_path / "p2", height=1500)
