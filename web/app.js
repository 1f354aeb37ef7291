// Fiatprint page: live price, implied-price clouds, history.
// Speaks protocol v1 of /ws (docs/websocket.md). No external requests.
"use strict";
(() => {
  const PROTOCOL = 1;
  const MAX_POINTS = 20000;
  const MAX_BLOCKS = 32;
  const BACKOFF_MIN = 500;      // ms
  const BACKOFF_MAX = 30000;    // ms
  const STALE_AGE = 1800;       // s: the price is shown as stale after this
  // Below this many outputs in the window the page says the price may be off
  // by a factor of two (the fit can lock onto half or double the price).
  const FEW_OUTPUTS = 1500;
  const DOT = 2;                // CSS px
  const CELL = 8;               // CSS px, hover grid cell
  const HOVER_RADIUS = 6;       // CSS px
  const CYAN = "#22d3ee";
  const ORANGE = "#fb923c";

  const $ = (id) => document.getElementById(id);
  const el = {
    conn: $("conn"), node: $("node"), price: $("price"), age: $("age"),
    details: $("details"), notice: $("notice"), cloud: $("cloud"), tip: $("tip"),
    nConfirmed: $("n-confirmed"), nMempool: $("n-mempool"), blocks: $("blocks"),
    historyPanel: $("history-panel"), history: $("history"),
  };

  // ------------------------------------------------------------------ state
  const state = {
    estimate: null,
    // Points as parallel arrays, oldest first (cheap to trim and to draw).
    price: [], sats: [], time: [], txid: [], confirmed: [],
    blocks: [],
    status: {},
    history: [],
    lastSeq: 0,
  };
  window.fiatprint = { state, drawn: 0, connected: false, snapshots: 0 };

  // Index of each point by txid, amount and price. A transaction's points
  // come again when its state changes (mempool -> confirmed when its block
  // connects, back on a disconnection) and replace the earlier copies in
  // place; a snapshot may hold both copies, and the later one wins. Two equal
  // outputs of one transaction give the same key and one dot (they would be
  // drawn on the same pixel anyway).
  let pointIndex = new Map();
  const pointKey = (txid, sats, price) => txid + "|" + sats + "|" + price;

  function clearPoints() {
    state.price = []; state.sats = []; state.time = []; state.txid = [];
    state.confirmed = [];
    pointIndex = new Map();
  }

  function addPoints(rows) {
    for (const r of rows) {
      if (r[0] === null) continue;
      const key = pointKey(r[3], r[1], r[0]);
      const i = pointIndex.get(key);
      if (i !== undefined) {
        state.time[i] = r[2]; state.confirmed[i] = r[4];
        continue;
      }
      pointIndex.set(key, state.price.length);
      state.price.push(r[0]); state.sats.push(r[1]); state.time.push(r[2]);
      state.txid.push(r[3]); state.confirmed.push(r[4]);
    }
    const extra = state.price.length - MAX_POINTS;
    if (extra > 0) {
      for (const k of ["price", "sats", "time", "txid", "confirmed"]) {
        state[k] = state[k].slice(extra);
      }
      pointIndex = new Map();
      for (let i = 0; i < state.price.length; i++) {
        pointIndex.set(pointKey(state.txid[i], state.sats[i], state.price[i]), i);
      }
    }
  }

  // ------------------------------------------------------------------ text
  const usd = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });
  const usd2 = new Intl.NumberFormat("en-US", {
    minimumFractionDigits: 2, maximumFractionDigits: 2,
  });

  function ageText(seconds) {
    if (seconds < 2) return "just now";
    if (seconds < 90) return `${Math.round(seconds)} s ago`;
    if (seconds < 5400) return `${Math.round(seconds / 60)} min ago`;
    if (seconds < 172800) return `${(seconds / 3600).toFixed(1)} h ago`;
    return `${Math.round(seconds / 86400)} days ago`;
  }

  function clock(t) {
    return new Date(t * 1000).toLocaleTimeString([], { hour12: false });
  }

  function renderPrice() {
    const e = state.estimate;
    if (!e) {
      el.price.textContent = "\u2014";
      el.age.textContent = "waiting for the first estimate";
      el.details.textContent = "";
      return;
    }
    if (e.price === null) {
      el.price.textContent = "\u2014";
      el.details.textContent = e.reason || "";
    } else {
      el.price.textContent = "$" + usd.format(e.price);
      el.price.title = "$" + usd2.format(e.price);
      const parts = [`rough $${usd.format(e.rough_price)}`];
      if (e.spread !== null) parts.push(`spread \u00b1$${usd.format(e.spread)}`);
      parts.push(`${e.points.toLocaleString()} points from ` +
        `${e.outputs.toLocaleString()} outputs`);
      if (e.outputs < FEW_OUTPUTS) {
        // With few outputs the fit can lock onto half or double the price.
        parts.push(`few outputs yet: the price may be off by a factor of two`);
      }
      el.details.textContent = parts.join(" \u00b7 ");
      el.price.classList.toggle("few", e.outputs < FEW_OUTPUTS);
    }
    renderAge();
  }

  function renderAge() {
    const e = state.estimate;
    if (!e) return;
    const age = Math.max(0, Date.now() / 1000 - e.updated);
    el.age.textContent = "updated " + ageText(age);
    el.age.classList.toggle("old", age > STALE_AGE);
    el.price.classList.toggle("stale", age > STALE_AGE || !window.fiatprint.connected);
  }

  function setConn(cls, text) {
    el.conn.className = "pill " + cls;
    el.conn.textContent = text;
  }

  function renderStatus() {
    el.node.replaceChildren();
    for (const [name, s] of Object.entries(state.status).sort()) {
      const span = document.createElement("span");
      const good = /^(ok|up|live|synced|running)$/i.test(s.status);
      const bad = /^(down|error|failed|lost)$/i.test(s.status);
      span.className = "pill " + (good ? "ok" : bad ? "bad" : "warn");
      span.textContent = `${name}: ${s.status}`;
      span.title = s.detail ? `${s.detail} (${clock(s.time)})` : clock(s.time);
      el.node.append(span);
    }
  }

  function renderBlocks() {
    el.blocks.replaceChildren();
    if (!state.blocks.length) {
      const li = document.createElement("li");
      li.className = "empty"; li.textContent = "none yet";
      el.blocks.append(li);
      return;
    }
    for (const b of state.blocks.slice().reverse()) {
      const li = document.createElement("li");
      if (b.kind === "disconnected") li.className = "dis";
      const h = document.createElement("span");
      h.className = "h"; h.textContent = b.height === null ? "?" : String(b.height);
      const t = document.createElement("span"); t.textContent = clock(b.time);
      const n = document.createElement("span");
      n.textContent = `${b.confirmed_txids.toLocaleString()} tx`;
      const hash = document.createElement("span");
      hash.className = "hash"; hash.textContent = b.hash; hash.title = b.hash;
      li.append(h, t, n, hash);
      el.blocks.append(li);
    }
  }

  function notice(text) {
    el.notice.textContent = text;
    el.notice.hidden = !text;
  }

  // ------------------------------------------------------------------ canvas
  let needsDraw = false;
  function scheduleDraw() {
    if (needsDraw) return;
    needsDraw = true;
    requestAnimationFrame(() => { needsDraw = false; draw(); drawHistory(); });
  }

  function sizeCanvas(canvas) {
    const dpr = window.devicePixelRatio || 1;
    const w = canvas.clientWidth, h = canvas.clientHeight;
    const pw = Math.max(1, Math.round(w * dpr)), ph = Math.max(1, Math.round(h * dpr));
    if (canvas.width !== pw || canvas.height !== ph) {
      canvas.width = pw; canvas.height = ph;
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    return { ctx, w, h };
  }

  // Small stable hash of a txid, for spreading a block's points over the
  // ten minutes before it (they all carry the block's time).
  function jitter(txid) {
    let x = 0;
    for (let i = 0; i < 8; i++) x = (x * 31 + txid.charCodeAt(i)) >>> 0;
    return (x % 1000) / 1000;
  }

  function yRange() {
    const e = state.estimate;
    if (e && e.band) return [e.band[0], e.band[1]];
    if (e && e.price) return [e.price * 0.85, e.price * 1.15];
    if (!state.price.length) return [0, 1];
    const s = state.price.slice().sort((a, b) => a - b);
    return [s[Math.floor(s.length * 0.05)], s[Math.floor(s.length * 0.95)] || s[0] + 1];
  }

  let grid = new Map();   // cell key -> point indices, rebuilt on every draw
  let drawnXY = null;     // Float32Array x,y per point (NaN when not drawn)

  function draw() {
    const t0 = performance.now();
    const { ctx, w, h } = sizeCanvas(el.cloud);
    ctx.clearRect(0, 0, w, h);
    const padL = 64, padR = 12, padT = 22, padB = 24, gap = 18;
    const plotW = w - padL - padR - gap;
    const leftW = Math.round(plotW * 0.62), rightW = plotW - leftW;
    const panels = [
      { x0: padL, w: leftW, confirmed: true, color: CYAN, label: "Confirmed" },
      { x0: padL + leftW + gap, w: rightW, confirmed: false, color: ORANGE,
        label: "Mempool" },
    ];
    const [lo, hi] = yRange();
    const yOf = (p) => padT + (1 - (p - lo) / (hi - lo)) * (h - padT - padB);

    // Axes and grid.
    ctx.font = "11px system-ui, sans-serif";
    ctx.textBaseline = "middle";
    ctx.fillStyle = "#7b8a9c";
    ctx.strokeStyle = "#1f2a36";
    ctx.lineWidth = 1;
    const step = niceStep((hi - lo) / 6);
    const hasScale = state.estimate !== null || state.price.length > 0;
    ctx.beginPath();
    for (let v = Math.ceil(lo / step) * step; hasScale && v <= hi; v += step) {
      const y = Math.round(yOf(v)) + 0.5;
      ctx.moveTo(padL, y); ctx.lineTo(w - padR, y);
      ctx.textAlign = "right";
      ctx.fillText("$" + usd.format(v), padL - 6, y);
    }
    ctx.stroke();

    // Time ranges per panel.
    const n = state.price.length;
    const xs = new Float64Array(n);
    for (const p of panels) {
      let tmin = Infinity, tmax = -Infinity;
      for (let i = 0; i < n; i++) {
        if (state.confirmed[i] !== p.confirmed) continue;
        const t = p.confirmed
          ? state.time[i] - 600 * jitter(state.txid[i])
          : state.time[i];
        xs[i] = t;
        if (t < tmin) tmin = t;
        if (t > tmax) tmax = t;
      }
      if (!(tmax > tmin)) {
        tmin = (isFinite(tmin) ? tmin : 0) - 300;
        tmax = tmin + 600;
      }
      p.tmin = tmin; p.tmax = tmax;
      ctx.textAlign = "left";
      ctx.fillStyle = p.color;
      ctx.fillText(p.label, p.x0 + 4, padT - 11);
      ctx.fillStyle = "#7b8a9c";
      if (isFinite(tmin) && tmin > 0) {
        ctx.fillText(clock(tmin), p.x0, h - padB + 12);
        ctx.textAlign = "right";
        ctx.fillText(clock(tmax), p.x0 + p.w, h - padB + 12);
      }
      ctx.strokeStyle = "#1f2a36";
      ctx.strokeRect(p.x0 + 0.5, padT + 0.5, p.w - 1, h - padT - padB - 1);
    }

    // Dots: one fillStyle per cloud, one fillRect per point.
    grid = new Map();
    drawnXY = new Float32Array(2 * n).fill(NaN);
    let drawn = 0;
    ctx.globalAlpha = 0.8;
    for (const p of panels) {
      ctx.fillStyle = p.color;
      const span = p.tmax - p.tmin;
      for (let i = 0; i < n; i++) {
        if (state.confirmed[i] !== p.confirmed) continue;
        const v = state.price[i];
        if (v < lo || v > hi) continue;
        const x = p.x0 + 2 + ((xs[i] - p.tmin) / span) * (p.w - 4 - DOT);
        const y = yOf(v);
        ctx.fillRect(x, y, DOT, DOT);
        drawnXY[2 * i] = x; drawnXY[2 * i + 1] = y;
        const key = Math.floor(x / CELL) * 65536 + Math.floor(y / CELL);
        const cell = grid.get(key);
        if (cell) cell.push(i); else grid.set(key, [i]);
        drawn++;
      }
    }
    ctx.globalAlpha = 1;

    // The current price across both clouds.
    const e = state.estimate;
    if (e && e.price !== null) {
      const y = Math.round(yOf(e.price)) + 0.5;
      ctx.strokeStyle = "#e2e8f0aa";
      ctx.setLineDash([4, 4]);
      ctx.beginPath(); ctx.moveTo(padL, y); ctx.lineTo(w - padR, y); ctx.stroke();
      ctx.setLineDash([]);
    }
    window.fiatprint.drawn = drawn;
    window.fiatprint.xy = drawnXY;
    window.fiatprint.drawMs = performance.now() - t0;
    let nc = 0;
    for (let i = 0; i < n; i++) if (state.confirmed[i]) nc++;
    el.nConfirmed.textContent = nc.toLocaleString();
    el.nMempool.textContent = (n - nc).toLocaleString();
  }

  function niceStep(raw) {
    const p = Math.pow(10, Math.floor(Math.log10(raw || 1)));
    for (const m of [1, 2, 2.5, 5, 10]) if (raw <= m * p) return m * p;
    return 10 * p;
  }

  function nearest(mx, my) {
    if (!drawnXY) return -1;
    const cx = Math.floor(mx / CELL), cy = Math.floor(my / CELL);
    let best = -1, bestD = HOVER_RADIUS * HOVER_RADIUS;
    for (let dx = -1; dx <= 1; dx++) {
      for (let dy = -1; dy <= 1; dy++) {
        const cell = grid.get((cx + dx) * 65536 + (cy + dy));
        if (!cell) continue;
        for (const i of cell) {
          const ex = drawnXY[2 * i] + DOT / 2 - mx;
          const ey = drawnXY[2 * i + 1] + DOT / 2 - my;
          const d = ex * ex + ey * ey;
          if (d <= bestD) { bestD = d; best = i; }
        }
      }
    }
    return best;
  }

  el.cloud.addEventListener("mousemove", (ev) => {
    const r = el.cloud.getBoundingClientRect();
    const mx = ev.clientX - r.left, my = ev.clientY - r.top;
    const i = nearest(mx, my);
    if (i < 0) { el.tip.hidden = true; return; }
    const btc = state.sats[i] / 1e8;
    el.tip.replaceChildren();
    const lines = [
      `$${usd2.format(state.price[i])} implied`,
      `${btc.toFixed(8)} BTC (${state.sats[i].toLocaleString()} sats)`,
      `${state.confirmed[i] ? "confirmed" : "mempool"}, ${clock(state.time[i])}`,
    ];
    for (const t of lines) {
      const d = document.createElement("div"); d.textContent = t; el.tip.append(d);
    }
    const tx = document.createElement("div");
    tx.className = "txid"; tx.textContent = state.txid[i];
    el.tip.append(tx);
    el.tip.hidden = false;
    const tw = el.tip.offsetWidth;
    el.tip.style.left = Math.min(mx + 12, r.width - tw - 4) + "px";
    el.tip.style.top = Math.max(0, my - 70) + "px";
  });
  el.cloud.addEventListener("mouseleave", () => { el.tip.hidden = true; });
  window.addEventListener("resize", scheduleDraw);

  // ------------------------------------------------------------------ history
  function historyRows(rows) {
    const out = [];
    for (const r of rows) {
      const t = Array.isArray(r) ? r[0] : (r.time ?? r.t ?? r.timestamp);
      const p = Array.isArray(r) ? r[1] : r.price;
      if (typeof t === "number" && typeof p === "number") out.push([t, p]);
    }
    return out.sort((a, b) => a[0] - b[0]);
  }

  async function loadHistory() {
    try {
      const to = Date.now() / 1000;
      const url = new URL("api/v1/history", document.baseURI);
      url.searchParams.set("from", String(Math.floor(to - 7 * 86400)));
      url.searchParams.set("to", String(Math.ceil(to)));
      const res = await fetch(url, { cache: "no-store" });
      if (!res.ok) { el.historyPanel.hidden = true; return; }
      state.history = historyRows((await res.json()).rows || []);
      el.historyPanel.hidden = state.history.length < 2;
      if (!state.estimate && state.history.length) {
        const [t, p] = state.history[state.history.length - 1];
        state.estimate = {
          price: p, rough_price: Math.round(p), spread: null, band: null,
          points: 0, outputs: 0, updated: t, reason: null, fromHistory: true,
        };
        renderPrice();
        el.details.textContent = "from history, until the live estimate arrives";
      }
      scheduleDraw();
    } catch (err) {
      el.historyPanel.hidden = true;
    }
  }

  function drawHistory() {
    if (el.historyPanel.hidden || state.history.length < 2) return;
    const { ctx, w, h } = sizeCanvas(el.history);
    ctx.clearRect(0, 0, w, h);
    const rows = state.history;
    let lo = Infinity, hi = -Infinity;
    for (const [, p] of rows) { if (p < lo) lo = p; if (p > hi) hi = p; }
    if (hi - lo < 1) { lo -= 1; hi += 1; }
    const t0 = rows[0][0], t1 = rows[rows.length - 1][0];
    const padL = 64, padB = 18, padT = 8;
    const x = (t) => padL + ((t - t0) / (t1 - t0 || 1)) * (w - padL - 8);
    const y = (p) => padT + (1 - (p - lo) / (hi - lo)) * (h - padT - padB);
    ctx.font = "11px system-ui, sans-serif";
    ctx.fillStyle = "#7b8a9c"; ctx.textAlign = "right"; ctx.textBaseline = "middle";
    ctx.fillText("$" + usd.format(hi), padL - 6, y(hi));
    ctx.fillText("$" + usd.format(lo), padL - 6, y(lo));
    ctx.textAlign = "left";
    ctx.fillText(new Date(t0 * 1000).toLocaleString(), padL, h - 6);
    ctx.textAlign = "right";
    ctx.fillText(new Date(t1 * 1000).toLocaleString(), w - 8, h - 6);
    ctx.strokeStyle = CYAN; ctx.lineWidth = 1.5;
    ctx.beginPath();
    rows.forEach(([t, p], i) => (i ? ctx.lineTo(x(t), y(p)) : ctx.moveTo(x(t), y(p))));
    ctx.stroke();
  }

  // ------------------------------------------------------------------ socket
  function wsUrl() {
    const u = new URL("ws", document.baseURI);
    u.protocol = u.protocol === "https:" ? "wss:" : "ws:";
    u.hash = ""; u.search = "";
    return u.href;
  }

  let attempt = 0;
  let socket = null;
  let retryTimer = null;

  function connect() {
    retryTimer = null;
    setConn("warn", attempt ? "reconnecting\u2026" : "connecting\u2026");
    let ws;
    try {
      ws = new WebSocket(wsUrl());
    } catch (err) {
      retry();
      return;
    }
    socket = ws;
    ws.onmessage = (ev) => {
      let m;
      try { m = JSON.parse(ev.data); } catch (err) { return; }
      if (!m || m.v !== PROTOCOL) return;
      handle(m);
    };
    ws.onclose = () => {
      if (socket !== ws) return;
      socket = null;
      window.fiatprint.connected = false;
      renderAge();
      retry();
    };
    ws.onerror = () => { /* onclose follows */ };
  }

  function retry() {
    if (retryTimer !== null) return;
    // Full jitter over an exponentially growing ceiling; never gives up.
    const ceiling = Math.min(BACKOFF_MAX, BACKOFF_MIN * Math.pow(2, attempt));
    const delay = ceiling / 2 + Math.random() * ceiling / 2;
    attempt = Math.min(attempt + 1, 16);
    setConn("bad", `disconnected, retrying in ${Math.ceil(delay / 1000)} s`);
    retryTimer = setTimeout(connect, delay);
  }

  function handle(m) {
    switch (m.type) {
      case "snapshot":
        attempt = 0;
        window.fiatprint.connected = true;
        window.fiatprint.snapshots++;
        setConn("ok", "live");
        if (m.estimate) state.estimate = m.estimate;
        clearPoints();
        addPoints(m.points);
        state.blocks = m.blocks.slice(-MAX_BLOCKS);
        state.status = m.status;
        state.lastSeq = m.seq;
        renderPrice(); renderStatus(); renderBlocks();
        if (window.fiatprint.snapshots > 1) loadHistory();
        break;
      case "gap":
        notice(m.resync
          ? `This page fell behind; ${m.dropped} updates were skipped and ` +
            "it has been brought up to date."
          : `This page fell behind; ${m.dropped} batches of points were ` +
            "skipped and are missing from the clouds.");
        setTimeout(() => notice(""), 10000);
        break;
      case "estimate":
        state.estimate = m; state.lastSeq = m.seq; renderPrice();
        break;
      case "points":
        addPoints(m.points); state.lastSeq = m.seq;
        break;
      case "block":
        // The same block may come twice (from ZMQ, then from the full block
        // with its height): the later message replaces the earlier one.
        state.blocks = state.blocks.filter(
          (b) => !(b.hash === m.hash && b.kind === m.kind));
        state.blocks.push(m);
        if (state.blocks.length > MAX_BLOCKS) state.blocks.shift();
        state.lastSeq = m.seq; renderBlocks();
        break;
      case "status":
        state.status[m.component] = {
          status: m.status, detail: m.detail, time: m.time,
        };
        state.lastSeq = m.seq; renderStatus();
        break;
      default:
        return;
    }
    scheduleDraw();
  }

  setInterval(renderAge, 1000);
  loadHistory();
  connect();
  scheduleDraw();
})();
