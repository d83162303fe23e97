/* layerwatch live drift dashboard.
 *
 * Polls the worker's /api/dashboard/* views every 2 s and draws them with plotly.js.
 * Access token: read once from the URL fragment (#token=...), kept in sessionStorage,
 * removed from the address bar, sent as "Authorization: Bearer <token>" on every fetch;
 * on 401 the page asks for it in a form. It is never put in a URL sent to the server.
 *
 * After each render the page writes what it drew into data attributes (body
 * data-status / data-refreshes, chart cards data-points / data-bands, alert rows
 * data-alert-id), so a headless browser's DOM dump shows the outcome.
 */
(function () {
  "use strict";

  const POLL_MS = 2000;
  const COMBINED = "__combined__";
  const TOKEN_KEY = "layerwatch.token";
  const COLORS = { rate: "#2563eb", pval: "#f59e0b", alert: "#dc2626", grid: "#eef1f6", ink: "#1c2333", muted: "#6b7486" };
  const LABEL_PALETTE = ["#ef4444", "#8b5cf6", "#f59e0b", "#0ea5e9", "#ec4899", "#10b981", "#84cc16", "#f97316", "#6366f1"];
  const LABEL_CLEAN = "#94a3b8";

  const fragment = new URLSearchParams(location.hash.slice(1));
  const state = {
    token: "",
    minutes: fragment.get("minutes") && fragment.get("minutes") !== "data" ? clampInt(fragment.get("minutes"), 15, 1, 10080) : null, // null: the data's span
    model: fragment.get("model") || "",
    selected: fragment.get("window") ? { window_id: fragment.get("window"), layer: fragment.get("layer") || "" } : null,
    windowLoaded: false,
    paused: false,
    needAuth: false,
    inflight: false,
    refreshes: 0,
    lastDrift: null,
    lastModels: null,
    labelColors: {},
  };

  // ------------------------------------------------------------------ helpers

  function clampInt(value, dflt, lo, hi) {
    const n = parseInt(value, 10);
    return Number.isFinite(n) ? Math.max(lo, Math.min(hi, n)) : dflt;
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "dataset") Object.assign(node.dataset, v);
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  const pad = (n, w = 2) => String(n).padStart(w, "0");
  // The browser's time zone, shown wherever times are: "Europe/Berlin (UTC+01:00)".
  function utcOffset(ms) {
    const off = -new Date(ms).getTimezoneOffset();
    return `UTC${off >= 0 ? "+" : "-"}${pad(Math.floor(Math.abs(off) / 60))}:${pad(Math.abs(off) % 60)}`;
  }
  const TZ_NAME = (Intl.DateTimeFormat().resolvedOptions().timeZone || "local time");
  const tzLabel = () => `${TZ_NAME} (${utcOffset(Date.now())})`;
  const rangeParams = () => (state.minutes ? { minutes: state.minutes } : { range: "data" });
  // Plotly takes date strings without a zone as wall-clock time: give it local time.
  function plotTime(ms) {
    const d = new Date(ms);
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
  }
  function clock(ms) {
    const d = new Date(ms);
    return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }
  // the clock time, with the date when it is not today
  function dayClock(ms, now) {
    const d = new Date(ms);
    return new Date(now).toDateString() === d.toDateString() ? clock(ms)
      : `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${clock(ms)}`;
  }
  function ago(ms, now) {
    const s = Math.max(0, Math.round((now - ms) / 1000));
    if (s < 60) return `${s}s ago`;
    if (s < 3600) return `${Math.floor(s / 60)}m ago`;
    return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m ago`;
  }
  function duration(ms) {
    const s = Math.round(ms / 1000);
    if (s < 60) return `${s}s`;
    if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
    return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
  }
  const fmt = (v, digits = 2) => (v === null || v === undefined ? "–" : Number(v).toFixed(digits));
  const layerName = (layer) => (layer === COMBINED ? "combined" : layer);
  const shortId = (id) => (id.length > 24 ? id.slice(0, 10) + "…" + id.slice(-10) : id);
  const fmtP = (v) => (v === null || v === undefined ? "–" : v > 0 && v < 0.001 ? Number(v).toExponential(1) : Number(v).toFixed(3));

  function setStatus(status, text) {
    document.body.dataset.status = status;
    document.getElementById("status-text").textContent = text;
  }

  function saveFragment() {
    const f = new URLSearchParams();
    if (state.minutes) f.set("minutes", state.minutes);
    if (state.model) f.set("model", state.model);
    if (state.selected) {
      f.set("window", state.selected.window_id);
      if (state.selected.layer) f.set("layer", state.selected.layer);
    }
    const hash = f.toString();
    history.replaceState(null, "", location.pathname + location.search + (hash ? "#" + hash : ""));
  }

  // ------------------------------------------------------------------ token + fetch

  class AuthError extends Error {}

  function initToken() {
    const fromFragment = fragment.get("token");
    if (fromFragment) {
      try { sessionStorage.setItem(TOKEN_KEY, fromFragment); } catch (e) { /* storage off: keep it in memory */ }
    }
    let stored = "";
    try { stored = sessionStorage.getItem(TOKEN_KEY) || ""; } catch (e) { /* ignore */ }
    state.token = fromFragment || stored;
    saveFragment(); // drops the token from the address bar
  }

  async function api(path, params) {
    const url = new URL("api/dashboard/" + path, document.baseURI);
    for (const [k, v] of Object.entries(params || {})) if (v !== "" && v !== null && v !== undefined) url.searchParams.set(k, v);
    const headers = { Accept: "application/json" };
    if (state.token) headers.Authorization = "Bearer " + state.token;
    const response = await fetch(url, { headers, cache: "no-store", credentials: "omit" });
    if (response.status === 401) throw new AuthError("unauthorized");
    const body = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(body.error || `${path}: HTTP ${response.status}`);
    return body;
  }

  function showAuth(show) {
    state.needAuth = show;
    document.getElementById("auth").hidden = !show;
    if (show) {
      setStatus("auth", state.token ? "token rejected" : "token required");
      document.getElementById("auth-token").focus();
    }
  }

  // ------------------------------------------------------------------ models strip

  const WAITING = { awaiting_reference: "NO REFERENCE", awaiting_traffic: "NO TRAFFIC", awaiting_windows: "COLLECTING" };

  function renderModels(models, alerts, drift) {
    const strip = document.getElementById("models");
    const openShift = new Set(alerts.alerts.filter((a) => a.status === "open" && a.kind === "distribution_shift").map((a) => a.model_id));
    const openCount = {};
    for (const a of alerts.alerts) if (a.status === "open") openCount[a.model_id] = (openCount[a.model_id] || 0) + 1;
    const select = document.getElementById("model-filter");
    const known = new Set([...select.options].map((o) => o.value));
    for (const m of models.models) if (!known.has(m.model_id)) select.append(el("option", { value: m.model_id }, m.model_id));
    select.value = state.model;

    strip.replaceChildren(...models.models.map((m) => {
      const main = m.layers.find((l) => l.layer === COMBINED) || m.layers[0];
      const rate = main ? main.last_detection_rate : null;
      const drifting = openShift.has(m.model_id);
      return el("div", {
        class: "model-card" + (drifting ? " drifting" : "") + (state.model === m.model_id ? " selected" : ""),
        dataset: { model: m.model_id }, title: "show only this model",
        onclick: () => setModel(state.model === m.model_id ? "" : m.model_id),
      },
      el("div", { class: "title" }, el("span", {}, m.model_id),
        el("span", { class: "pill" + (WAITING[m.state] ? " waiting" : ""), title: WAITING[m.state] ? "see the drift section" : null },
          drifting ? "DRIFT" : WAITING[m.state] || "OK")),
      el("div", { class: "stats" },
        el("span", {}, el("b", {}, m.events.toLocaleString()), "events"),
        el("span", {}, el("b", {}, fmt(rate)), main ? `rate (${layerName(main.layer)})` : "rate"),
        el("span", {}, el("b", {}, String(openCount[m.model_id] || 0)), "open alerts"),
        el("span", {}, el("b", {}, String(m.layers.filter((l) => l.layer !== COMBINED).length)), "layers"),
        el("span", { title: "events after their windows closed / event times clamped (ahead of their record), since this worker started" },
          el("b", {}, `${(m.late_events || 0).toLocaleString()} / ${(m.clamped_events || 0).toLocaleString()}`), "late / clamped")));
    }));
  }

  function setModel(model) {
    state.model = model;
    document.getElementById("model-filter").value = model;
    saveFragment();
    refresh(true);
  }

  // ------------------------------------------------------------------ alerts

  function renderAlerts(payload) {
    const tbody = document.querySelector("#alerts tbody");
    const now = payload.clock_ms || payload.now_ms;
    const alerts = payload.alerts.filter((a) => !state.model || a.model_id === state.model);
    const open = alerts.filter((a) => a.status === "open").length;
    const count = document.getElementById("alerts-count");
    count.textContent = open ? `${open} open` : "none open";
    count.className = "count" + (open ? " hot" : "");
    document.getElementById("alerts-empty").hidden = alerts.length > 0;
    tbody.replaceChildren(...alerts.map((a) => {
      const clickable = Boolean(a.window_id);
      return el("tr", {
        class: [a.status === "open" ? "open" : "", clickable ? "clickable" : ""].join(" ").trim() || null,
        dataset: { alertId: a.alert_id, state: a.status, kind: a.kind, model: a.model_id },
        title: clickable ? "show the window's suspicious events" : null,
        onclick: clickable ? () => selectWindow(a.window_id, "") : null,
      },
      el("td", {}, el("span", { class: "badge " + a.status }, a.status)),
      el("td", {}, el("span", { class: "badge " + a.severity }, a.severity)),
      el("td", {}, a.kind.replace("_", " ")),
      el("td", { class: "mono" }, a.model_id),
      el("td", { title: new Date(a.opened_ms).toString() }, dayClock(a.opened_ms, now), el("div", { class: "hint" }, ago(a.opened_ms, now))),
      el("td", {}, a.status === "resolved" ? [clock(a.resolved_ms), el("div", { class: "hint" }, "after " + duration(a.duration_ms))]
        : el("span", { class: "hint" }, "open for " + duration(now - a.opened_ms))),
      el("td", { class: "msg" }, a.message, a.client_id ? el("div", { class: "hint" }, "client " + a.client_id) : null));
    }));
  }

  // ------------------------------------------------------------------ drift charts

  const cards = new Map(); // "model\u0000layer" -> chart card element

  function chartCard(grid, key, model, layer) {
    let card = cards.get(key);
    if (card) return card;
    const plot = el("div", { class: "chart" });
    card = el("div", { class: "chart-card", dataset: { key, chart: "drift", model, layer, points: "0", bands: "0" } },
      el("div", { class: "chart-head" },
        el("span", { class: "chart-title" }, model + " ", el("span", { class: "layer" }, "· " + layerName(layer)),
          el("span", { class: "note" })),
        el("span", { class: "latest" })),
      plot);
    cards.set(key, card);
    card.plot = plot;
    return card;
  }

  function driftFigure(series, payload, bands) {
    const x = series.window_end_ms.map(plotTime);
    const custom = series.window_id.map((w, i) => [w, series.n_window[i], series.model_version[i], series.mmd2[i]]);
    const traces = [
      {
        name: "detection rate", x, y: series.detection_rate, customdata: custom, type: "scatter", mode: "lines+markers",
        line: { color: COLORS.rate, width: 2, shape: "linear" }, marker: { color: COLORS.rate, size: 5 },
        hovertemplate: "%{x|%H:%M:%S}<br>detection rate <b>%{y:.2f}</b><br>n=%{customdata[1]} · MMD² %{customdata[3]:.4f}<br>window %{customdata[0]}<extra></extra>",
      },
      {
        name: "p-value", x, y: series.p_value, customdata: custom, type: "scatter", mode: "lines", yaxis: "y2",
        line: { color: COLORS.pval, width: 1.3, dash: "dot" }, opacity: 0.8,
        hovertemplate: "%{x|%H:%M:%S}<br>p-value <b>%{y:.3f}</b><br>window %{customdata[0]}<extra></extra>",
      },
    ];
    const sel = state.selected;
    if (sel) {
      const i = series.window_id.indexOf(sel.window_id);
      if (i >= 0) {
        traces.push({
          name: "selected", x: [x[i]], y: [series.detection_rate[i]], customdata: [custom[i]], type: "scatter", mode: "markers",
          marker: { size: 15, color: "rgba(0,0,0,0)", line: { color: COLORS.ink, width: 2 } }, hoverinfo: "skip",
        });
      }
    }
    const shapes = [{
      type: "line", xref: "paper", x0: 0, x1: 1, yref: "y", y0: payload.threshold, y1: payload.threshold,
      line: { color: COLORS.alert, width: 1.4, dash: "dash" },
    }];
    for (const b of bands) {
      shapes.push({
        type: "rect", xref: "x", yref: "paper", x0: plotTime(Math.max(b.start_ms, payload.since_ms)), x1: plotTime(b.end_ms), y0: 0, y1: 1,
        fillcolor: b.open ? "rgba(220,38,38,0.16)" : "rgba(220,38,38,0.09)", line: { width: 0 }, layer: "below",
      });
    }
    const layout = {
      height: 240, margin: { l: 48, r: 48, t: 8, b: 40 }, showlegend: false, hovermode: "closest",
      paper_bgcolor: "rgba(0,0,0,0)", plot_bgcolor: "rgba(0,0,0,0)",
      font: { family: "system-ui, -apple-system, Segoe UI, Roboto, sans-serif", size: 11, color: COLORS.muted },
      xaxis: { type: "date", range: [plotTime(payload.since_ms), plotTime(payload.now_ms)], gridcolor: COLORS.grid, zeroline: false,
               title: { text: tzLabel(), font: { size: 10 }, standoff: 4 } },
      yaxis: { title: { text: "detection rate", font: { color: COLORS.rate } }, range: [0, 1.05], gridcolor: COLORS.grid, zeroline: false, tickfont: { color: COLORS.rate } },
      yaxis2: { title: { text: "p-value", font: { color: COLORS.pval } }, range: [0, 1.05], overlaying: "y", side: "right", showgrid: false, zeroline: false, tickfont: { color: COLORS.pval } },
      shapes, uirevision: series.model_id + "/" + series.layer + "/" + payload.minutes,
    };
    return { traces, layout };
  }

  // What the drift section waits for, per model without charts (models payload "state").
  const HELP = {
    awaiting_reference: (m) => [`${m}: awaiting its clean reference. `, "Publish it (", el("code", {}, "layerwatch reference"),
      " for the demo models, or a Publisher with ", el("code", {}, "role=\"reference\""), " from your server); windows are tested once it is stored."],
    awaiting_traffic: (m) => [`${m}: reference stored, no live predictions yet. `, "Send traffic to the model (", el("code", {}, "layerwatch simulate"), " for the demo)."],
    awaiting_windows: (m) => [`${m}: collecting the first window. `, "A window is tested once it holds ", el("code", {}, "LW_WINDOW_MIN_SAMPLES"), " live events."],
  };

  function renderEmpty(models, payload) {
    const box = document.getElementById("drift-empty");
    const shown = new Set(payload.series.map((s) => s.model_id));
    const waiting = models ? models.models.filter((m) => !shown.has(m.model_id) && m.state !== "ok" && (!state.model || m.model_id === state.model)) : [];
    if (!models || (models.models.length === 0 && payload.series.length === 0)) {
      box.dataset.empty = "no-model";
      box.replaceChildren(
        el("p", { class: "what" }, "No model has sent predictions yet."),
        el("p", {}, "Start the demo with ", el("code", {}, "layerwatch demo"), ", or publish ", el("code", {}, "PredictionBatch"),
          " records from your inference server (", el("code", {}, "workers.inference.Publisher"), ") to ",
          el("code", {}, "lw.predictions"), ". Then publish the model's clean reference: its windows are tested against it."),
        el("p", {}, state.minutes ? `Nothing in the last ${state.minutes} min: choose "all data" to see older runs.` : ""));
      box.hidden = false;
      return;
    }
    if (!waiting.length) {
      box.dataset.empty = payload.series.length ? "none" : "no-windows";
      box.replaceChildren(el("p", {}, payload.series.length ? "" : "No tested windows in this range."));
      box.hidden = payload.series.length > 0;
      return;
    }
    box.dataset.empty = waiting[0].state.replace("_", "-");
    box.replaceChildren(el("ul", {}, waiting.map((m) => el("li", { dataset: { model: m.model_id, state: m.state } },
      (HELP[m.state] || ((id) => [`${id}: no tested windows yet.`]))(m.model_id)))));
    box.hidden = false;
  }

  async function renderDrift(payload) {
    state.lastDrift = payload;
    const grid = document.getElementById("drift-grid");
    renderEmpty(state.lastModels, payload);
    const keep = new Set();
    const draws = [];
    for (const s of payload.series) {
      const key = s.model_id + "\u0000" + s.layer;
      keep.add(key);
      const card = chartCard(grid, key, s.model_id, s.layer);
      if (grid.children[keep.size - 1] !== card) grid.insertBefore(card, grid.children[keep.size - 1] || null); // payload order
      const bands = payload.bands[s.model_id] || [];
      const { traces, layout } = driftFigure(s, payload, bands);
      const n = s.detection_rate.length;
      const last = n ? s.detection_rate[n - 1] : null;
      const hot = last !== null && last >= payload.threshold;
      card.querySelector(".latest").replaceChildren("latest ", el("b", { class: hot ? "hot" : null }, fmt(last)),
        n ? ` · p ${fmtP(s.p_value[n - 1])} · ${s.windows.toLocaleString()} windows` : "",
        s.downsampled ? el("span", { class: "note", title: "each point is the highest detection rate of its run of windows" }, ` (${n} points shown)`) : "");
      card.querySelector(".chart-title .note").textContent = s.only_layer ? " (the model's only tapped layer: also its combined test)" : "";
      card.dataset.windows = String(s.windows);
      if (!card.plotted) {
        card.plotted = true;
        draws.push(Plotly.newPlot(card.plot, traces, layout, { displaylogo: false, displayModeBar: false, responsive: true }).then(() => {
          card.plot.on("plotly_click", (ev) => {
            const p = ev.points && ev.points[0];
            if (p && p.customdata) selectWindow(p.customdata[0], card.dataset.layer);
          });
        }).then(() => Object.assign(card.dataset, { points: String(n), bands: String(bands.length) })));
      } else {
        draws.push(Plotly.react(card.plot, traces, layout).then(() => Object.assign(card.dataset, { points: String(n), bands: String(bands.length) })));
      }
    }
    for (const [key, card] of cards) {
      if (!keep.has(key)) { Plotly.purge(card.plot); card.remove(); cards.delete(key); }
    }
    await Promise.all(draws);
  }

  // ------------------------------------------------------------------ label mix

  function labelColor(kind) {
    if (kind === "clean") return LABEL_CLEAN;
    if (!state.labelColors[kind]) state.labelColors[kind] = LABEL_PALETTE[Object.keys(state.labelColors).length % LABEL_PALETTE.length];
    return state.labelColors[kind];
  }

  // Which score labelled the events: the supervised detector fitted for that model version,
  // the unsupervised score of the model's own reference (flags without a family: "unknown"),
  // or the output-only forest of older rows ("classifier").
  const SCORE_KIND_TITLES = { supervised: "supervised", unsupervised: "unsupervised (own reference)", classifier: "forest (output only)" };

  function labelName(s) {
    return s.score_kind === "unsupervised" && s.attack_type === "unknown" ? "flagged" : s.attack_type;
  }

  async function renderLabels(payload) {
    const div = document.getElementById("labels-chart");
    document.getElementById("labels-empty").hidden = payload.buckets.length > 0;
    div.hidden = payload.buckets.length === 0;
    const kinds = (payload.kinds || []).map((k) =>
      `${SCORE_KIND_TITLES[k.score_kind] || k.score_kind}: ${k.events} events, ${k.flagged} flagged`).join(" · ");
    document.getElementById("labels-hint").textContent =
      `events per attack type, split by the score that labelled them, per ${duration(payload.bucket_ms)}` +
      (kinds ? ` — ${kinds}` : "");
    const x = payload.buckets.map((b) => plotTime(b + payload.bucket_ms / 2));
    const traces = payload.series.map((s) => {
      const name = labelName(s);
      const title = SCORE_KIND_TITLES[s.score_kind] || s.score_kind;
      return {
        name, x, y: s.events, type: "bar", legendgroup: s.score_kind, legendgrouptitle: { text: title },
        offsetgroup: s.score_kind, alignmentgroup: "labels",
        marker: { color: labelColor(s.attack_type === "unknown" ? "flagged" : s.attack_type),
                  pattern: { shape: s.score_kind === "supervised" ? "" : "/", fillmode: "overlay", size: 6 } },
        hovertemplate: `%{x|%H:%M:%S} · ${title} · ${name}: <b>%{y}</b><extra></extra>`,
      };
    });
    const layout = {
      height: 290, margin: { l: 48, r: 16, t: 8, b: 40 }, barmode: "stack", bargap: 0.12, hovermode: "closest",
      paper_bgcolor: "rgba(0,0,0,0)", plot_bgcolor: "rgba(0,0,0,0)",
      font: { family: "system-ui, -apple-system, Segoe UI, Roboto, sans-serif", size: 11, color: COLORS.muted },
      legend: { orientation: "h", x: 0, y: 1.18, groupclick: "toggleitem" },
      xaxis: { type: "date", range: [plotTime(payload.since_ms), plotTime(payload.now_ms)], gridcolor: COLORS.grid,
               title: { text: tzLabel(), font: { size: 10 }, standoff: 4 } },
      yaxis: { title: { text: "events" }, gridcolor: COLORS.grid, rangemode: "tozero" },
      uirevision: "labels/" + payload.minutes,
    };
    await Plotly.react(div, traces, layout, { displaylogo: false, displayModeBar: false, responsive: true });
    div.dataset.points = String(payload.buckets.length);
    div.dataset.types = [...new Set(payload.series.map((s) => s.attack_type))].join(",");
    div.dataset.kinds = (payload.kinds || []).map((k) => `${k.score_kind}:${k.events}:${k.flagged}`).join(",");
  }

  // ------------------------------------------------------------------ window events

  // The demo's inputs are 8x8 grayscale images flattened to 64 floats in [0, 1]: draw
  // them (any n x n) as dark ink on white, scaled up without smoothing, as a PNG data URL.
  function imageURL(values) {
    if (!values || !values.length) return null;
    const side = Math.round(Math.sqrt(values.length));
    if (side * side !== values.length || side < 2) return null;
    let max = 0;
    for (const v of values) if (v > max) max = v;
    const scale = max > 1 ? 1 / max : 1;
    const small = document.createElement("canvas");
    small.width = small.height = side;
    const ctx = small.getContext("2d");
    const img = ctx.createImageData(side, side);
    values.forEach((v, i) => {
      const g = Math.round(255 * (1 - Math.max(0, Math.min(1, v * scale))));
      img.data.set([g, g, g, 255], i * 4);
    });
    ctx.putImageData(img, 0, 0);
    const zoom = Math.max(1, Math.round(56 / side));
    const big = document.createElement("canvas");
    big.width = big.height = side * zoom;
    const bctx = big.getContext("2d");
    bctx.imageSmoothingEnabled = false;
    bctx.drawImage(small, 0, 0, big.width, big.height);
    return big.toDataURL("image/png");
  }

  function selectWindow(windowId, layer) {
    state.selected = { window_id: windowId, layer: layer || "" };
    state.windowLoaded = false;
    saveFragment();
    const panel = document.getElementById("window-panel");
    panel.hidden = false;
    document.getElementById("window-title").textContent = "Suspicious events · loading…";
    loadWindow().then(() => panel.scrollIntoView({ behavior: "smooth", block: "start" })).catch(onError);
    if (state.lastDrift) renderDrift(state.lastDrift).catch(onError);
  }

  async function loadWindow() {
    const sel = state.selected;
    if (!sel) return;
    const payload = await api("window", { window_id: sel.window_id, layer: sel.layer });
    if (state.selected !== sel) return;
    renderWindow(payload);
    state.windowLoaded = payload.events.length > 0;
  }

  function renderWindow(w) {
    const panel = document.getElementById("window-panel");
    panel.hidden = false;
    panel.dataset.window = w.window_id;
    const head = w.layers[0];
    document.getElementById("window-title").textContent =
      `Suspicious events · ${w.model_id || "unknown model"}${w.layer ? " · " + layerName(w.layer) : " · all layers"}`;
    const meta = document.getElementById("window-meta");
    const chips = [el("span", { class: "chip mono", title: w.window_id }, "window ", el("b", {}, shortId(w.window_id)))];
    if (head) {
      chips.push(el("span", { class: "chip" }, el("b", {}, `${clock(head.window_start_ms)} – ${clock(head.window_end_ms)}`)));
      chips.push(el("span", { class: "chip" }, el("b", {}, String(head.n_window)), " events vs ", el("b", {}, String(head.n_reference)), " reference"));
      const threshold = state.lastDrift ? state.lastDrift.threshold : 0.5;
      for (const l of w.layers) {
        chips.push(el("span", { class: "chip" + ((l.detection_rate || 0) >= threshold ? " hot" : "") },
          layerName(l.layer) + ": rate ", el("b", {}, fmt(l.detection_rate)), " · p ", el("b", {}, fmtP(l.p_value))));
      }
    }
    meta.replaceChildren(...chips);
    const tbody = document.querySelector("#window-events tbody");
    const top = Math.max(...w.events.map((e) => e.score || 0), 1e-12);
    document.getElementById("window-empty").hidden = w.events.length > 0;
    tbody.replaceChildren(...w.events.map((e, i) => {
      const url = imageURL(e.input);
      const label = e.label;
      const adversarial = label && label.attack_type !== "clean";
      return el("tr", { dataset: { eventId: e.event_id } },
        el("td", { class: "num" }, String(i + 1)),
        el("td", {}, url ? el("img", { class: "digit", src: url, alt: "input of " + e.event_id, width: 56, height: 56 }) : el("span", { class: "noimg" }, "no input")),
        el("td", { class: "mono", title: e.event_id }, shortId(e.event_id), el("div", { class: "hint" }, "layer " + layerName(e.layer))),
        el("td", { class: "num" }, fmt(e.score, 4), el("span", { class: "scorebar", style: `width:${Math.round(40 * Math.max(0, e.score || 0) / top)}px` })),
        el("td", { class: "num" }, e.ts_ms ? [String(e.predicted), el("div", { class: "hint" }, "conf " + fmt(e.confidence))] : el("span", { class: "hint" }, "–")),
        el("td", {}, label ? [el("span", { class: "badge " + (adversarial ? "adv" : "clean") }, label.attack_type),
          el("div", { class: "hint" }, `p(adv) ${fmt(label.p_adversarial)}${label.score_kind ? " (" + label.score_kind + ")" : ""}${label.family && label.family !== "clean" ? " · " + label.family : ""}${label.target_model ? " · " + label.target_model : ""}`)] : el("span", { class: "hint" }, "–")),
        el("td", {}, e.attack ? el("span", { class: "badge adv" }, e.attack) : el("span", { class: "hint" }, "none")),
        el("td", { class: "mono" }, e.client_id || "–"),
        el("td", {}, e.ts_ms ? clock(e.ts_ms) : "–"));
    }));
    panel.dataset.events = String(w.events.length);
    panel.dataset.images = String(w.events.filter((e) => imageURL(e.input)).length);
  }

  // ------------------------------------------------------------------ polling

  function onError(err) {
    if (err instanceof AuthError) showAuth(true);
    else setStatus("error", "error: " + (err && err.message ? err.message : err));
  }

  async function refresh(force) {
    if (state.inflight || state.needAuth || (state.paused && !force)) return;
    if (document.hidden && !force) return;
    state.inflight = true;
    try {
      const filter = { ...rangeParams(), model_id: state.model };
      // The model summary counts events (the largest table): every 5th poll is enough.
      const wantModels = force || !state.lastModels || state.refreshes % 5 === 0;
      const [models, drift, labels, alerts] = await Promise.all([
        wantModels ? api("models", rangeParams()) : state.lastModels,
        // alerts of every model: the model cards show them; the table filters by model itself
        api("drift", filter), api("labels", filter), api("alerts", rangeParams()),
      ]);
      state.lastModels = models;
      renderModels(models, alerts, drift);
      renderAlerts(alerts);
      await renderDrift(drift);
      await renderLabels(labels);
      if (state.selected && !state.windowLoaded) {
        document.getElementById("window-panel").hidden = false;
        await loadWindow();
      }
      state.refreshes += 1;
      document.body.dataset.refreshes = String(state.refreshes);
      setStatus(state.paused ? "paused" : "ok", (state.paused ? "paused · " : "live · ") + "updated " + clock(Date.now()));
    } catch (err) {
      onError(err);
    } finally {
      state.inflight = false;
    }
  }

  function start() {
    initToken();
    document.getElementById("tz").textContent = "times in " + tzLabel();
    document.getElementById("tz-footer").textContent = "times in " + tzLabel();
    document.getElementById("range").value = state.minutes ? String(state.minutes) : "data";
    if (!document.getElementById("range").value) {
      document.getElementById("range").append(el("option", { value: state.minutes }, `last ${state.minutes} min`));
      document.getElementById("range").value = String(state.minutes);
    }
    document.getElementById("range").addEventListener("change", (ev) => {
      state.minutes = ev.target.value === "data" ? null : clampInt(ev.target.value, 15, 1, 10080);
      saveFragment();
      refresh(true);
    });
    document.getElementById("model-filter").addEventListener("change", (ev) => setModel(ev.target.value));
    document.getElementById("pause").addEventListener("click", (ev) => {
      state.paused = !state.paused;
      ev.target.textContent = state.paused ? "Resume" : "Pause";
      setStatus(state.paused ? "paused" : "ok", state.paused ? "paused" : "resuming…");
      if (!state.paused) refresh(true);
    });
    document.getElementById("window-close").addEventListener("click", () => {
      state.selected = null;
      document.getElementById("window-panel").hidden = true;
      saveFragment();
      if (state.lastDrift) renderDrift(state.lastDrift).catch(onError);
    });
    document.getElementById("auth-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const input = document.getElementById("auth-token");
      state.token = input.value.trim();
      input.value = "";
      try { sessionStorage.setItem(TOKEN_KEY, state.token); } catch (e) { /* ignore */ }
      showAuth(false);
      refresh(true);
    });
    document.addEventListener("visibilitychange", () => { if (!document.hidden) refresh(); });
    if (state.selected) document.getElementById("window-panel").hidden = false;
    if (typeof Plotly === "undefined") {
      setStatus("error", "plotly.js did not load");
      return;
    }
    refresh(true);
    setInterval(refresh, POLL_MS);
  }

  start();
})();
