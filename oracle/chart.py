"""A self-contained HTML chart of every price point of a window.

The page makes no external request: data, script and style are inline. Points
are drawn on a canvas against block height (each block's points spread evenly
across its width, in output order) with the block's UTC time on the axis; the
final price and the chart band are marked, and hovering shows the point's
price, amount, height and time.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from .report import PriceReport

__all__ = ["chart_html", "write_chart"]


def _x_positions(heights: np.ndarray) -> np.ndarray:
    """Height plus the output's fraction of its block: spreads a block's points."""
    x = heights.astype(np.float64)
    if len(heights) == 0:
        return x
    starts = np.flatnonzero(np.r_[True, heights[1:] != heights[:-1]])
    ends = np.r_[starts[1:], len(heights)]
    for s, e in zip(starts, ends, strict=True):
        x[s:e] += np.arange(e - s) / (e - s)
    return x


def chart_html(report: PriceReport) -> str:
    e = report.estimate
    idx = e.point_output
    heights = report.heights
    x_all = _x_positions(heights) if len(heights) else heights.astype(float)
    data = {
        "price": e.price,
        "rough": e.rough_price,
        "band": list(e.band) if e.band else None,
        "reason": e.reason,
        "x": np.round(x_all[idx], 4).tolist(),
        "p": np.round(e.points, 2).tolist(),
        "sats": np.round(report.amounts[idx] * 1e8).astype(np.int64).tolist(),
        "h": heights[idx].tolist(),
        "t": report.times[idx].tolist(),
    }
    title = report.human()
    payload = json.dumps(data, separators=(",", ":"))
    return _TEMPLATE.replace("__TITLE__", html.escape(title)).replace(
        "__DATA__", payload.replace("</", "<\\/")
    )


def write_chart(report: PriceReport, path: Path) -> None:
    """Write the chart page to ``path``. Raises OSError if it cannot."""
    path.write_text(chart_html(report), encoding="utf-8")


_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Fiatprint chart</title>
<style>
html,body{margin:0;background:#0b0f14;color:#cfd8e3;
  font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif}
header{padding:14px 20px 4px}
h1{margin:0;font-size:30px;color:#fff;font-weight:600}
h1 small{font-size:15px;color:#8aa0b4;font-weight:400;margin-left:10px}
p{margin:4px 0 0;color:#8aa0b4}
#wrap{position:relative;height:calc(100vh - 100px);min-height:360px;margin:8px 12px}
canvas{width:100%;height:100%;display:block}
#tip{position:absolute;pointer-events:none;background:#111a24;border:1px solid #2b4a5e;
  padding:6px 9px;border-radius:4px;font-size:12px;white-space:nowrap;display:none}
</style></head><body>
<header><h1 id="price"></h1><p>__TITLE__</p></header>
<div id="wrap"><canvas id="c"></canvas><div id="tip"></div></div>
<script id="data" type="application/json">__DATA__</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const fmt = v => "$" + v.toLocaleString("en-US", {maximumFractionDigits: 2,
  minimumFractionDigits: 2});
document.getElementById("price").innerHTML = D.price === null
  ? "No price <small>" + D.reason + "</small>"
  : fmt(D.price) + " <small>rough $" + D.rough.toLocaleString("en-US") + "</small>";
const cv = document.getElementById("c"), tip = document.getElementById("tip");
const ctx = cv.getContext("2d");
const n = D.p.length;
let x0 = Infinity, x1 = -Infinity;
for (let i = 0; i < n; i++) {
  if (D.x[i] < x0) x0 = D.x[i];
  if (D.x[i] > x1) x1 = D.x[i];
}
if (!(x1 > x0)) { x0 -= 0.5; x1 = x0 + 1; }
const mid = D.price !== null ? D.price : (D.rough || 1);
const y0 = mid * 0.8, y1 = mid * 1.2;
const M = {l: 78, r: 16, t: 10, b: 44};
let W = 0, H = 0, grid = new Map();
function sx(x) { return M.l + (x - x0) / (x1 - x0) * (W - M.l - M.r); }
function sy(y) { return M.t + (y1 - y) / (y1 - y0) * (H - M.t - M.b); }
function draw() {
  const r = window.devicePixelRatio || 1, b = cv.getBoundingClientRect();
  W = b.width; H = b.height;
  cv.width = Math.round(W * r); cv.height = Math.round(H * r);
  ctx.setTransform(r, 0, 0, r, 0, 0);
  ctx.fillStyle = "#0b0f14"; ctx.fillRect(0, 0, W, H);
  ctx.font = "12px system-ui,sans-serif"; ctx.fillStyle = "#8aa0b4";
  ctx.strokeStyle = "#1c2733"; ctx.lineWidth = 1;
  for (let k = 0; k <= 8; k++) {
    const v = y0 + (y1 - y0) * k / 8, y = sy(v);
    ctx.beginPath(); ctx.moveTo(M.l, y); ctx.lineTo(W - M.r, y); ctx.stroke();
    ctx.textAlign = "right"; ctx.fillText("$" + Math.round(v).toLocaleString("en-US"),
      M.l - 8, y + 4);
  }
  const hs = [...new Set(D.h)];
  const step = Math.max(1, Math.ceil(hs.length / 8));
  ctx.textAlign = "center";
  for (let k = 0; k < hs.length; k += step) {
    const i = D.h.indexOf(hs[k]), x = sx(hs[k] + 0.5 * (hs.length === 1));
    const t = new Date(D.t[i] * 1000).toISOString().slice(0, 16).replace("T", " ");
    ctx.fillText(hs[k] >= 0 ? String(hs[k]) : "", x, H - M.b + 16);
    ctx.fillText(t + " UTC", x, H - M.b + 32);
  }
  if (D.band) {
    ctx.fillStyle = "rgba(0,200,220,0.07)";
    ctx.fillRect(M.l, sy(D.band[1]), W - M.l - M.r, sy(D.band[0]) - sy(D.band[1]));
  }
  grid = new Map();
  ctx.fillStyle = "rgba(0,215,235,0.55)";
  for (let i = 0; i < n; i++) {
    const p = D.p[i]; if (p < y0 || p > y1) continue;
    const x = sx(D.x[i]), y = sy(p);
    ctx.fillRect(x - 1, y - 1, 2, 2);
    const key = (x >> 3) + "," + (y >> 3);
    let cell = grid.get(key); if (!cell) grid.set(key, cell = []); cell.push(i);
  }
  if (D.price !== null) {
    const y = sy(D.price);
    ctx.strokeStyle = "#ff9f1a"; ctx.lineWidth = 1.5; ctx.setLineDash([6, 4]);
    ctx.beginPath(); ctx.moveTo(M.l, y); ctx.lineTo(W - M.r, y); ctx.stroke();
    ctx.setLineDash([]); ctx.fillStyle = "#ff9f1a"; ctx.textAlign = "left";
    ctx.fillText(fmt(D.price), M.l + 6, y - 6);
  }
}
cv.addEventListener("mousemove", ev => {
  const b = cv.getBoundingClientRect();
  const mx = ev.clientX - b.left, my = ev.clientY - b.top;
  let best = -1, bd = 64;
  for (let gx = (mx >> 3) - 1; gx <= (mx >> 3) + 1; gx++)
    for (let gy = (my >> 3) - 1; gy <= (my >> 3) + 1; gy++)
      for (const i of grid.get(gx + "," + gy) || []) {
        const d = (sx(D.x[i]) - mx) ** 2 + (sy(D.p[i]) - my) ** 2;
        if (d < bd) { bd = d; best = i; }
      }
  if (best < 0) { tip.style.display = "none"; return; }
  const t = new Date(D.t[best] * 1000).toISOString().replace("T", " ").slice(0, 19);
  tip.innerHTML = fmt(D.p[best]) + "<br>" + (D.sats[best] / 1e8).toFixed(8) +
    " BTC (" + D.sats[best].toLocaleString("en-US") + " sats)<br>block " + D.h[best] +
    "<br>" + t + " UTC";
  tip.style.display = "block";
  tip.style.left = Math.min(mx + 14, W - 220) + "px"; tip.style.top = (my + 14) + "px";
});
cv.addEventListener("mouseleave", () => { tip.style.display = "none"; });
window.addEventListener("resize", draw);
draw();
</script></body></html>
"""
