"""The viewer over HTTP: pages, filters, escaping, paths kept inside the store, read-only, bad input, load."""

from __future__ import annotations

import hashlib
import json
import re
import socket
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import pytest
from typer.testing import CliRunner

from mechscope import records
from mechscope.viewer import PortInUse, is_loopback, make_viewer_server, serve_in_thread


def _rows(page: str) -> list[str]:
    return re.findall(r"<a class='run-link' href='/runs/([^']+)'>", page)


def test_the_list_shows_every_run_and_filters_narrow_it(server, store, get):
    status, page, headers = get(server + "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert set(_rows(page)) == {store.lens, store.heads, store.heads2, store.missing}
    assert "4 of 4 runs" in page
    assert _rows(get(server + "/?tag=heads")[1]) == [store.heads2, store.heads]  # newest first
    assert set(_rows(get(server + "/?tag=tiny")[1])) == {store.lens, store.heads, store.heads2}
    assert _rows(get(server + "/?tag=heads&q=" + quote(store.heads))[1]) == [store.heads]
    assert _rows(get(server + "/?q=LOST")[1]) == [store.missing]  # case-insensitive name search
    assert _rows(get(server + "/?q=" + quote(store.heads[-6:]))[1]) == [store.heads]  # by id
    assert _rows(get(server + "/?q=nothing-like-this")[1]) == [] and "No runs match" in get(server + "/?q=zz")[1]
    assert _rows(get(server + "/?status=failed")[1]) == []


def test_every_string_from_a_run_is_escaped(server, store, get):
    for url in ("/", f"/runs/{store.lens}", f"/compare?id={store.lens}&id={store.heads}"):
        page = get(server + url)[1]
        assert "<script>document" not in page and "<img src=x" not in page
        assert "&lt;script&gt;document.title=" in page or "\\u003cscript\\u003e" in page
    page = get(server + f"/runs/{store.lens}")[1]
    assert "description &lt;script&gt;" in page
    # figure JSON sits in a data element that cannot be closed early
    for data in re.findall(r"<script type='application/json' id='[^']+'>(.*?)</script>", page, re.S):
        assert "<" not in data and json.loads(data)["data"]


def test_a_run_page_shows_provenance_metrics_figures_and_tables(server, store, get):
    status, page, headers = get(server + f"/runs/{store.lens}")
    assert status == 200
    assert "Content-Security-Policy" in headers and "script-src 'self'" in headers["Content-Security-Policy"]
    for text in ("final_kl", "first_kl", "5 steps (0..4)", "tiny-gpt2", "version: torch", "evaluation", "side effect"):
        assert text in page, text
    figures = re.findall(r"<div class='figure' id='([^']+)'", page)
    assert "fig-series" in figures and len(figures) >= 3  # loss series, lens heatmap, evaluation bars
    assert '<script src="/static/plotly.min.js"></script>' in page
    js = get(server + "/static/plotly.min.js")
    assert js[0] == 200 and "plotly" in js[1][:2000].lower() and len(js[1]) > 1_000_000  # served locally
    assert "cdn" not in page.lower()


def test_a_missing_artifact_is_named_on_the_page_instead_of_failing(server, store, get):
    status, page, _ = get(server + f"/runs/{store.missing}")
    assert status == 200 and "class='missing'" in page and f"missing file {store.missing_file}" in page
    status, body, _ = get(server + f"/runs/{store.missing}/files/{store.missing_name}")
    assert status == 404 and "missing file" in body


def test_comparison_shows_metrics_of_both_runs_side_by_side(server, store, get):
    status, page, _ = get(server + f"/compare?id={store.lens}&id={store.heads}")
    assert status == 200
    assert page.count(store.lens) >= 2 and page.count(store.heads) >= 2
    assert "final_kl" in page and "0.5" in page and "max_induction" in page
    assert "fig-metrics" in page and "What differs" in page and "config.prompts" in page
    assert get(server + f"/compare?id={store.lens}")[0] == 400
    assert get(server + f"/compare?id={store.lens}&id=nope")[0] == 404


def test_unknown_pages_methods_and_traversal_are_refused(server, store, get):
    assert get(server + "/runs/nope")[0] == 404
    assert get(server + "/", method="POST")[0] == 405
    for path in (
        "/static/..%2F..%2Fetc%2Fpasswd",
        "/static/../records/store.py",
        f"/runs/{store.lens}/files/..%2F..%2Fruns.sqlite",
        f"/runs/{store.lens}/files/%2Fetc%2Fpasswd",
        "/runs/..%2Fruns.sqlite",
        "/../runs.sqlite",
    ):
        status, body, _ = get(server + path)
        assert status in (400, 403, 404), path
        assert "CREATE TABLE" not in body and "root:" not in body
    status, body, headers = get(server + f"/runs/{store.lens}/files/{store.lens_file}")
    assert status == 200 and headers["Content-Type"] == "application/octet-stream"  # a real file downloads


def test_a_tampered_database_cannot_send_the_viewer_outside_the_store(tmp_path, get):
    with records.run("t", store=tmp_path) as run:
        run.log_metric("x", 1.0)
    secret = tmp_path.parent / "secret.txt"
    secret.write_text("private")
    conn = sqlite3.connect(tmp_path / "runs.sqlite")
    for name, sha in (("dots", "../../secret"), ("abs", "/etc/passwd")):
        conn.execute(
            "INSERT INTO artifacts (run_id, name, role, sha256, ext, size) VALUES (?, ?, 'file', ?, 'txt', 1)",
            (run.id, name, sha),
        )
    link_sha = "ef" * 32
    conn.execute(
        "INSERT INTO artifacts (run_id, name, role, sha256, ext, size) VALUES (?, 'link', 'file', ?, 'txt', 1)",
        (run.id, link_sha),
    )
    conn.commit()
    conn.close()
    link = tmp_path / "artifacts" / link_sha[:2] / f"{link_sha}.txt"
    link.parent.mkdir(parents=True)
    link.symlink_to(secret)
    srv, _thread = serve_in_thread(tmp_path)
    try:
        base = f"http://127.0.0.1:{srv.server_port}"
        status, page, _ = get(base + f"/runs/{run.id}")
        assert status == 200 and "private" not in page and page.count("class='missing'>refused") == 3
        for name in ("dots", "abs", "link"):
            status, body, _ = get(base + f"/runs/{run.id}/files/{name}")
            assert status == 403 and "private" not in body
    finally:
        srv.shutdown()
        srv.server_close()
        srv.viewer.close()


def test_the_viewer_opens_the_store_read_only(server, store, get):
    db = store.root / "runs.sqlite"
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    for url in ("/", f"/runs/{store.lens}", f"/compare?id={store.lens}&id={store.heads}"):
        assert get(server + url)[0] == 200
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    server_obj, viewer = make_viewer_server(store.root, port=0)
    try:
        assert viewer.store.read_only
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            viewer.store._conn.execute("DELETE FROM runs")
    finally:
        server_obj.server_close()
        viewer.close()


def test_a_port_in_use_gives_a_clear_error_naming_it(store):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        with pytest.raises(PortInUse, match=rf"port {port} on 127.0.0.1 is already in use"):
            make_viewer_server(store.root, port=port)
        from mechscope.cli.main import app

        out = CliRunner().invoke(app, ["serve", "--runs", str(store.root), "--port", str(port), "--host", "0.0.0.0"])
        assert out.exit_code == 2
        assert "warning: listening on 0.0.0.0, not loopback" in out.output
        assert f"port {port} on 0.0.0.0 is already in use" in out.output
    finally:
        busy.close()
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")


def test_serving_a_folder_without_a_store_says_so(tmp_path):
    from mechscope.cli.main import app

    out = CliRunner().invoke(app, ["serve", "--runs", str(tmp_path / "none"), "--port", "0"])
    assert out.exit_code == 2 and "no run database" in out.output
    assert not (tmp_path / "none").exists()


def test_fifty_concurrent_requests_all_succeed_in_bounded_time(server, store, get):
    urls = [server + "/", server + f"/runs/{store.lens}"] * 25
    get(urls[1])  # figures are built once per file and cached; the load is on pages, not first renders
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(lambda u: get(u, timeout=60), urls))
    elapsed = time.perf_counter() - start
    assert len(results) == 50
    assert [s for s, _, _ in results] == [200] * 50
    assert all(store.lens in body for _, body, _ in results)
    assert elapsed < 45, f"50 concurrent requests took {elapsed:.1f} s"


def test_a_long_list_shows_the_newest_runs_and_says_how_many_match(server, store, get, monkeypatch):
    import mechscope.viewer.server as viewer_server

    monkeypatch.setattr(viewer_server, "_LIST_LIMIT", 2)
    page = get(server + "/")[1]
    assert _rows(page) == [store.missing, store.heads2]
    assert "4 of 4 runs (the newest 2 of 4 that match are shown)" in page
    with records.open_store(store.root, read_only=True) as s:
        assert s.count() == 4 and s.count(tag="heads") == 2 and len(s.runs(tag="tiny", limit=1)) == 1


def test_requests_for_another_host_name_are_refused_on_loopback(server):
    """DNS rebinding: a page from evil.example rebound to 127.0.0.1 still sends Host: evil.example."""
    import http.client

    port = int(server.rsplit(":", 1)[1])
    for host, expected in ((f"evil.example:{port}", 403), (f"localhost:{port}", 200), (f"127.0.0.1:{port}", 200)):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.putrequest("GET", "/", skip_host=True)
        conn.putheader("Host", host)
        conn.endheaders()
        response = conn.getresponse()
        body = response.read().decode()
        conn.close()
        assert response.status == expected, (host, body[:300])
        if expected == 403:
            assert "unexpected Host header" in body and "run-link" not in body


def test_a_result_with_several_tensors_can_draw_each(server, store, get):
    page = get(server + f"/runs/{store.heads}")[1]
    links = re.findall(r"<a class='tensor-link' href='[^']*\?tensor=([^']+)'>([^<]+)</a>", page)
    assert {name for _, name in links} >= {"previous_token", "duplicate_token", "copying"}
    assert "<strong>induction</strong>" in page  # the default tensor, drawn now
    page = get(server + f"/runs/{store.heads}?tensor=head_detectors:previous_token")[1]
    assert "<strong>previous_token</strong>" in page and "head_detectors: previous_token" in page
    page = get(server + f"/runs/{store.heads}?tensor=head_detectors:nope")[1]
    assert "this result has no tensor &#x27;nope&#x27;" in page
