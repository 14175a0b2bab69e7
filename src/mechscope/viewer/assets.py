"""The viewer's own static files (served from memory) and the path of plotly.js inside the plotly package."""

from __future__ import annotations

from pathlib import Path

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:0;color:#1d232a;line-height:1.45;background:#fafbfc}
header{background:#23395b;color:#fff;padding:.6rem 1.2rem;display:flex;gap:1.2rem;align-items:baseline}
header a.home{color:#fff;font-weight:600;text-decoration:none;font-size:1.1rem}
header .store{color:#b9c7dc;font-family:ui-monospace,monospace;font-size:.85rem}
main{max-width:1250px;margin:0 auto;padding:.5rem 1.2rem 3rem}
h1{font-size:1.5rem}h2{color:#23395b;margin-top:2rem;border-bottom:1px solid #d0d7de}
table{border-collapse:collapse;margin:.6rem 0;background:#fff;font-size:.9rem}
td,th{border:1px solid #d0d7de;padding:.25rem .55rem;text-align:left;vertical-align:top}
th{background:#eef3f8}
code{font-family:ui-monospace,monospace;font-size:.85em}
pre{background:#fff;border:1px solid #d0d7de;padding:.6rem;overflow:auto;max-height:28rem;white-space:pre-wrap}
.status{border-radius:.7rem;padding:0 .5rem;font-size:.8rem;color:#fff;vertical-align:middle}
.status-finished{background:#2d8a4e}.status-failed{background:#c0392b}.status-running{background:#b7791f}
.tag{background:#e4ebf5;border-radius:.3rem;padding:0 .35rem;margin-right:.2rem;font-size:.8rem}
.filters{display:flex;gap:.5rem;align-items:center;margin:.6rem 0;flex-wrap:wrap}
.filters input[type=search]{width:18rem;padding:.25rem}
.missing,.error,.problem{color:#a61b1b;font-weight:500}
.figure{min-height:380px;background:#fff;border:1px solid #e1e4e8;margin:.5rem 0}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:.8rem}
section.file{border-left:3px solid #9db3d1;padding-left:.8rem;margin:1.2rem 0}
details{margin:.4rem 0}
"""

JS = """
"use strict";
(function () {
  function draw() {
    var divs = document.querySelectorAll("div.figure[data-figure]");
    for (var i = 0; i < divs.length; i++) {
      var div = divs[i];
      var holder = document.getElementById(div.getAttribute("data-figure"));
      if (!holder) { continue; }
      var fig = JSON.parse(holder.textContent);
      var layout = fig.layout || {};
      layout.autosize = true;
      Plotly.newPlot(div, fig.data || [], layout, {responsive: true, displaylogo: false});
      div.setAttribute("data-drawn", String((fig.data || []).length));
    }
    document.body.setAttribute("data-figures-drawn", String(divs.length));
  }
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", draw);
  } else {
    draw();
  }
})();
"""


def plotly_js_path() -> Path:
    """plotly.min.js as installed with the plotly package (no CDN)."""
    import plotly

    path = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    if not path.is_file():
        raise FileNotFoundError(f"plotly.min.js not found in the plotly package at {path}")
    return path


__all__ = ["CSS", "JS", "plotly_js_path"]
