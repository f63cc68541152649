// The status page: polls /status.json and draws it with uPlot (uPlot.iife.min.js, loaded before this file).
//
// Every string from the engine (model, lane and tenant names come from clients and the configuration) reaches
// the DOM as text: textContent and text nodes only, never innerHTML.
"use strict";
(function () {
  const KEY_ITEM = "trio-mapper.client-key";
  const CHART_HEIGHT = 150;
  // The least span of time drawn, so that a young engine's first samples are not stretched across the chart.
  const MIN_SPAN = 5 * 60;
  const PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7",
                   "#9c755f", "#bab0ac"];
  const COLORS = {tokens: "#2563eb", requests: "#9333ea", queued: "#f59e0b", retry_wait: "#ef4444",
                  in_flight: "#10b981", upstream_429s: "#dc2626", retries: "#6b7280", longest_wait: "#0ea5e9",
                  mean_wait: "#64748b"};

  const number = new Intl.NumberFormat(undefined, {maximumFractionDigits: 0});
  const decimal = new Intl.NumberFormat(undefined, {maximumFractionDigits: 1});
  const compact = new Intl.NumberFormat(undefined, {notation: "compact", maximumFractionDigits: 1});
  const $ = (id) => document.getElementById(id);

  let key = null;
  let timer = 0;
  let pollMs = 2000;
  let xRange = [0, 1];
  const lanes = new Map();      // lane name -> {card, charts, parts}
  let tenantCharts = null;      // {names, tokens: uPlot, queued: uPlot}

  // --- the client key ---------------------------------------------------------------------------------------

  function storage(action, value) {
    try {
      if (action === "get") return sessionStorage.getItem(KEY_ITEM);
      if (action === "set") sessionStorage.setItem(KEY_ITEM, value);
      if (action === "remove") sessionStorage.removeItem(KEY_ITEM);
    } catch (error) {
      // Storage disabled: the key lives in this page only.
    }
    return null;
  }

  // #key=... is never sent to the server; it is taken and removed from the address bar (and the history).
  function takeKeyFromFragment() {
    if (location.hash.length <= 1) return;
    const fragment = new URLSearchParams(location.hash.slice(1));
    if (!fragment.has("key")) return;
    const given = fragment.get("key").trim();
    if (given) {
      key = given;
      storage("set", given);
    }
    fragment.delete("key");
    const rest = fragment.toString();
    history.replaceState(null, "", location.pathname + location.search + (rest ? "#" + rest : ""));
  }

  function askForKey(message) {
    clearTimeout(timer);
    notice(message);
    $("status").hidden = true;
    $("key-form").hidden = false;
    $("key").focus();
  }

  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const given = $("key").value.trim();
    if (!given) return;
    key = given;
    storage("set", given);
    $("key").value = "";
    $("key-form").hidden = true;
    notice(null);
    poll();
  });

  // --- polling ----------------------------------------------------------------------------------------------

  async function poll() {
    clearTimeout(timer);
    if (document.hidden) return; // resumed by visibilitychange
    const headers = {Accept: "application/json"};
    if (key) headers.Authorization = "Bearer " + key;
    let response;
    try {
      response = await fetch("/status.json", {headers, cache: "no-store", credentials: "omit"});
    } catch (error) {
      notice("The engine does not answer (stopped, or restarting?). Trying again…");
      return schedule();
    }
    if (response.status === 401) {
      const refused = key !== null;
      key = null;
      storage("remove");
      return askForKey(refused ? "The engine did not accept this key." : "This engine asks for a client key.");
    }
    if (response.status === 403) {
      notice("This user or group is not in the engine's allowed_uids/allowed_gids.");
      return schedule();
    }
    if (!response.ok) {
      notice("The engine answered " + response.status + ". Trying again…");
      return schedule();
    }
    let status;
    try {
      status = await response.json();
    } catch (error) {
      notice("The engine's answer could not be read. Trying again…");
      return schedule();
    }
    pollMs = Math.max(500, (status.interval || 2) * 1000);
    notice(null);
    $("key-form").hidden = true;
    $("status").hidden = false;
    render(status);
    schedule();
  }

  function schedule() {
    clearTimeout(timer);
    timer = setTimeout(poll, pollMs);
  }

  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && $("key-form").hidden) poll();
  });

  function notice(message) {
    const element = $("notice");
    element.hidden = !message;
    element.textContent = message || "";
  }

  // --- rendering --------------------------------------------------------------------------------------------

  function render(status) {
    const history = status.history;
    const time = history.time;
    const now = time.length ? time[time.length - 1] : Date.now() / 1000;
    const start = time.length ? Math.max(time[0], now - status.window) : now;
    xRange = [Math.min(start, now - MIN_SPAN), now];
    renderEngine(status.engine);
    renderTenants(status.tenants, history);
    renderLanes(status.lanes, history);
  }

  function renderEngine(engine) {
    setStat(document, "version", engine.version || "?");
    setStat(document, "uptime", duration(engine.uptime || 0));
    setStat(document, "outstanding", number.format(engine.outstanding || 0) +
            (engine.max_queued ? " (max " + number.format(engine.max_queued) + ")" : ""));
    setStat(document, "in_flight", number.format(engine.in_flight || 0) + " of " +
            number.format(engine.max_concurrent_reqs || 0));
    setStat(document, "updated", new Date().toLocaleTimeString());
    const budget = engine.budget || {};
    const element = document.querySelector('[data-stat="budget"]');
    let text = "local";
    let state = "ok";
    if (budget.backend === "redis") {
      const engines = budget.engines ? ", " + budget.engines + " engine" + (budget.engines === 1 ? "" : "s") : "";
      if (budget.state === "ok") {
        text = "Redis ok" + engines;
      } else {
        text = "Redis " + (budget.state || "unreachable") + engines;
        state = "bad";
      }
    }
    if (engine.closing) {
      text += " · shutting down";
      state = "warn";
    }
    element.textContent = text;
    element.className = "state-" + state;
    renderReloads(engine.reloads);
  }

  // How the reloads went, told as the engine's STATUS= line tells it (`systemctl status`): a failure until a
  // reload succeeds, else the settings the files give that the engine does not run. The reason counts a bad
  // file's problems; the problems themselves are only in the engine's log.
  const STATUS_NAMES = 3;

  function renderReloads(reloads) {
    const stat = document.querySelector('[data-stat="reloads"]');
    const line = $("reload");
    if (!reloads) {
      stat.textContent = "–";
      line.hidden = true;
      return;
    }
    stat.textContent = number.format(reloads.applied || 0) + " applied · " + number.format(reloads.failed || 0) +
      " failed";
    const notApplied = reloads.not_applied || [];
    let text = "";
    let state = "ok";
    if (reloads.failure) {
      text = "Reload failed at " + timeOfDay(reloads.failure.at) + ": " + (reloads.failure.reason || "see the log");
      state = "bad";
    } else if (notApplied.length) {
      const more = notApplied.length - STATUS_NAMES;
      text = "Reloaded at " + timeOfDay(reloads.succeeded_at) + "; not applied: " +
        notApplied.slice(0, STATUS_NAMES).join(", ") + (more > 0 ? " and " + more + " more (see the log)" : "");
      state = "warn";
    }
    stat.className = "state-" + state;
    line.hidden = !text;
    line.textContent = text;
    line.className = "reload state-" + state;
  }

  function timeOfDay(seconds) {
    return typeof seconds === "number" ? new Date(seconds * 1000).toLocaleTimeString() : "?";
  }

  function renderTenants(tenants, history) {
    const names = Object.keys(tenants);
    for (const name of Object.keys(history.tenants)) if (!(name in tenants)) names.push(name);
    const color = (name) => PALETTE[names.indexOf(name) % PALETTE.length];
    const columns = names.map((name) => history.tenants[name] || {});
    const series = (field) => columns.map((column) => column[field] || history.time.map(() => 0));

    // Shares of the tokens spent over the window, at a glance.
    const totals = series("tokens").map((values) => values.reduce((sum, value) => sum + value, 0));
    const spent = totals.reduce((sum, value) => sum + value, 0);
    const shares = $("shares");
    shares.replaceChildren();
    if (!spent) {
      shares.append(element("span", "empty", "no tokens spent in the last 15 minutes"));
    }
    names.forEach((name, index) => {
      if (!spent || !totals[index]) return;
      const share = totals[index] / spent;
      const part = element("span", "share", share >= 0.08 ? name + " " + Math.round(share * 100) + "%" : "");
      part.style.flexBasis = (share * 100).toFixed(2) + "%";
      part.style.background = color(name);
      part.title = name + ": " + number.format(totals[index]) + " tokens (" + decimal.format(share * 100) + "%)";
      part.dataset.tenant = name;
      shares.append(part);
    });

    // The charts: rebuilt when the tenants change (a reload), otherwise given the new data.
    const signature = JSON.stringify(names);
    if (!tenantCharts || tenantCharts.signature !== signature) {
      if (tenantCharts) {
        tenantCharts.tokens.destroy();
        tenantCharts.queued.destroy();
      }
      const perMinute = series("tokens_per_minute");
      const stacked = stack(perMinute);
      tenantCharts = {
        signature,
        raw: perMinute,
        tokens: chart($("tenant-tokens"), {
          series: names.map((name, index) => ({
            label: name, stroke: color(name), fill: color(name) + "99", width: 1,
            value: (u, v, seriesIndex, row) => row == null ? "–" : number.format(tenantCharts.raw[index][row]),
          })),
          bands: stacked.bands, yValues: compact.format, yRange: atLeast(10),
        }, [history.time, ...stacked.data]),
        queued: chart($("tenant-queued"), {
          series: names.map((name) => ({label: name, stroke: color(name), width: 1.5})),
          yValues: compact.format, yRange: atLeast(4),
        }, [history.time, ...series("queued")]),
      };
    } else {
      tenantCharts.raw = series("tokens_per_minute");
      tenantCharts.tokens.setData([history.time, ...stack(tenantCharts.raw).data]);
      tenantCharts.queued.setData([history.time, ...series("queued")]);
    }

    // One card per tenant: who it is, what waits, what it spent.
    const cards = $("tenants");
    cards.replaceChildren(...names.map((name) => {
      const tenant = tenants[name] || {};
      const card = element("article", "tenant");
      card.dataset.tenant = name;
      const title = element("h3", null);
      const swatch = element("span", "swatch");
      swatch.style.background = color(name);
      title.append(swatch, element("span", "name", name));
      card.append(title);
      const figures = element("dl", "figures");
      figure(figures, "priority", tenant.priority ?? "–");
      figure(figures, "weight", tenant.weight ?? "–");
      figure(figures, "queued", number.format(tenant.queued || 0));
      figure(figures, "tokens_24h", number.format(tenant.tokens_24h || 0), "tokens, 24 h");
      if (tenant.tpm_cap) figure(figures, "tpm_cap", tenant.tpm_cap, "tpm cap");
      if (tenant.rpm_cap) figure(figures, "rpm_cap", tenant.rpm_cap, "rpm cap");
      card.append(figures);
      if (tenant.daily_tokens) {
        card.append(meter("daily budget", (tenant.tokens_24h || 0) / tenant.daily_tokens,
                          "of " + number.format(tenant.daily_tokens)));
      }
      return card;
    }));
  }

  function renderLanes(current, history) {
    const charted = Object.keys(history.lanes).sort();
    const container = $("lanes");
    for (const [name, lane] of lanes) {
      if (!charted.includes(name)) {
        lane.charts.forEach((chart) => chart.destroy());
        lane.card.remove();
        lanes.delete(name);
      }
    }
    charted.forEach((name, index) => {
      const columns = history.lanes[name];
      let lane = lanes.get(name);
      const data = laneData(history.time, columns);
      if (!lane) {
        lane = laneCard(name, data);
        lanes.set(name, lane);
      } else {
        lane.charts.forEach((chart, which) => chart.setData(data[which]));
      }
      if (container.children[index] !== lane.card) container.insertBefore(lane.card, container.children[index] || null);
      updateLane(lane, current[name], columns);
    });
    const idle = Object.keys(current).filter((name) => !charted.includes(name)).sort();
    const paragraph = $("idle-lanes");
    paragraph.hidden = !idle.length;
    paragraph.textContent = idle.length ? "At rest for the last 15 minutes: " + idle.join(", ") : "";
  }

  function laneData(time, columns) {
    const percent = (values) => values.map((value) => value * 100);
    return [
      [time, percent(columns.tokens_fraction), percent(columns.requests_fraction)],
      [time, columns.queued, columns.retry_wait, columns.in_flight, columns.upstream_429s, columns.retries],
      [time, columns.longest_wait, columns.mean_wait],
    ];
  }

  function laneCard(name, data) {
    const card = element("article", "lane");
    card.dataset.lane = name;
    const header = element("header", null);
    const paused = element("span", "badge", "");
    paused.hidden = true;
    const limits = element("span", "limits", "");
    header.append(element("h3", "name", name), limits, paused);
    const meters = element("div", "meters");
    const tokens = meter("tokens", 0, "");
    const requests = meter("requests", 0, "");
    meters.append(tokens, requests);
    const figures = element("dl", "figures");
    const charts = element("div", "charts");
    const places = ["Budget used, % of what the limit lets through", "Queue (lines) · 429s and retries per sample (bars)",
                    "Queue wait of answered requests, seconds"].map((caption) => {
      const place = element("div", "chart");
      const wrapper = element("figure", null);
      wrapper.append(element("figcaption", null, caption), place);
      charts.append(wrapper);
      return place;
    });
    card.append(header, meters, figures, charts);
    $("lanes").append(card);
    const bars = uPlot.paths.bars({size: [0.8, 12]});
    const made = [
      chart(places[0], {
        series: [
          {label: "tokens", stroke: COLORS.tokens, fill: COLORS.tokens + "22", width: 1.5,
           value: (u, v) => v == null ? "–" : decimal.format(v) + "%"},
          {label: "requests", stroke: COLORS.requests, width: 1.5,
           value: (u, v) => v == null ? "–" : decimal.format(v) + "%"},
        ],
        yValues: (v) => v + "%", yRange: atLeast(100),
      }, data[0]),
      chart(places[1], {
        series: [
          {label: "queued", stroke: COLORS.queued, fill: COLORS.queued + "22", width: 1.5},
          {label: "retry wait", stroke: COLORS.retry_wait, width: 1.5, dash: [4, 3]},
          {label: "in flight", stroke: COLORS.in_flight, width: 1.5},
          {label: "429s", stroke: COLORS.upstream_429s, fill: COLORS.upstream_429s + "aa", paths: bars, scale: "count"},
          {label: "retries", stroke: COLORS.retries, fill: COLORS.retries + "88", paths: bars, scale: "count"},
        ],
        yValues: compact.format, yRange: atLeast(4), second: "count",
      }, data[1]),
      chart(places[2], {
        series: [
          {label: "longest", stroke: COLORS.longest_wait, width: 1.5, value: (u, v) => v == null ? "–" : seconds(v)},
          {label: "mean", stroke: COLORS.mean_wait, width: 1.5, value: (u, v) => v == null ? "–" : seconds(v)},
        ],
        yValues: (v) => decimal.format(v) + " s", yRange: atLeast(1),
      }, data[2]),
    ];
    return {card, charts: made, parts: {limits, paused, tokens, requests, figures}};
  }

  function updateLane(lane, now, columns) {
    const parts = lane.parts;
    if (!now) {
      parts.limits.textContent = "(dropped by the scheduler)";
      return;
    }
    const budget = now.budget || {};
    const effective = budget.effective || {};
    parts.limits.textContent = number.format(effective.tpm || 0) + " tpm · " + number.format(effective.rpm || 0) +
      " rpm" + (budget.mode && budget.mode !== "bucket" ? " · " + budget.mode : "");
    parts.paused.hidden = !(budget.pause_remaining > 0);
    parts.paused.textContent = budget.pause_remaining > 0 ? "paused " + seconds(budget.pause_remaining) : "";
    setMeter(parts.tokens, ratio(budget.tokens_used, budget.token_capacity),
             number.format(budget.tokens_used || 0) + " / " + number.format(budget.token_capacity || 0));
    setMeter(parts.requests, ratio(budget.requests_used, budget.request_capacity),
             decimal.format(budget.requests_used || 0) + " / " + number.format(budget.request_capacity || 0));
    const figures = parts.figures;
    figures.replaceChildren();
    figure(figures, "queued", number.format(now.queued || 0));
    figure(figures, "retry_wait", number.format(now.retry_wait || 0), "retry wait");
    figure(figures, "in_flight", number.format(now.in_flight || 0), "in flight");
    const longest = columns.longest_wait.length ? Math.max(...columns.longest_wait) : 0;
    figure(figures, "longest_wait", seconds(longest), "longest wait, 15 min");
    figure(figures, "upstream_429s", number.format(now.upstream_429s || 0), "429s");
    figure(figures, "retries", number.format(now.retries || 0));
    figure(figures, "succeeded", number.format(now.succeeded || 0));
    figure(figures, "failed", number.format(now.failed || 0));
  }

  // --- charts -----------------------------------------------------------------------------------------------

  function chart(place, spec, data) {
    const css = getComputedStyle(document.documentElement);
    const muted = css.getPropertyValue("--muted").trim() || "#666";
    const grid = css.getPropertyValue("--line").trim() || "#ddd";
    const axis = (extra) => Object.assign({stroke: muted, grid: {stroke: grid, width: 1}, ticks: {stroke: grid}}, extra);
    const scales = {x: {time: true, range: () => xRange}, y: {range: spec.yRange}};
    const axes = [axis({space: 70}), axis({values: (u, values) => values.map(spec.yValues), size: 56})];
    if (spec.second) {
      scales[spec.second] = {range: atLeast(2)};
      axes.push(axis({scale: spec.second, side: 1, grid: {show: false}, size: 40,
                      values: (u, values) => values.map(compact.format)}));
    }
    const options = {
      width: Math.max(200, place.clientWidth),
      height: CHART_HEIGHT,
      series: [{}, ...spec.series],
      scales,
      axes,
      bands: spec.bands || [],
      legend: {live: true},
      cursor: {drag: {x: false, y: false}},
    };
    return new uPlot(options, data, place);
  }

  // The series stacked on one another; each band fills between a series and the one below it.
  function stack(columns) {
    const sums = (columns[0] || []).map(() => 0);
    const data = columns.map((values) => values.map((value, row) => (sums[row] += value || 0)));
    const bands = columns.slice(1).map((_, index) => ({series: [index + 2, index + 1]}));
    return {data, bands};
  }

  function atLeast(least) {
    return (u, min, max) => [0, Math.max(least, (max || 0) * 1.1)];
  }

  let resizing = 0;
  window.addEventListener("resize", () => {
    clearTimeout(resizing);
    resizing = setTimeout(() => {
      const all = [...lanes.values()].flatMap((lane) => lane.charts);
      if (tenantCharts) all.push(tenantCharts.tokens, tenantCharts.queued);
      for (const each of all) each.setSize({width: Math.max(200, each.root.parentNode.clientWidth), height: CHART_HEIGHT});
    }, 150);
  });

  // --- small DOM helpers (text only) -------------------------------------------------------------------------

  function element(tag, className, text) {
    const made = document.createElement(tag);
    if (className) made.className = className;
    if (text !== undefined) made.textContent = String(text);
    return made;
  }

  function figure(list, stat, value, label) {
    const item = element("div", null);
    const term = element("dt", null, label || stat.replace("_", " "));
    const definition = element("dd", null, value);
    definition.dataset.stat = stat;
    item.append(term, definition);
    list.append(item);
  }

  function setStat(root, stat, value) {
    const found = root.querySelector('[data-stat="' + stat + '"]');
    if (found) found.textContent = String(value);
  }

  function meter(label, fraction, text) {
    const row = element("div", "meter");
    row.dataset.meter = label;
    const bar = element("div", "bar");
    bar.append(element("div", "fill"));
    row.append(element("span", "label", label), bar, element("span", "value", ""));
    setMeter(row, fraction, text);
    return row;
  }

  function setMeter(row, fraction, text) {
    const fill = row.querySelector(".fill");
    const shown = Math.max(0, Math.min(1, fraction || 0));
    fill.style.width = (shown * 100).toFixed(1) + "%";
    fill.classList.toggle("high", fraction >= 0.75 && fraction < 0.95);
    fill.classList.toggle("full", fraction >= 0.95);
    const value = row.querySelector(".value");
    value.textContent = Math.round((fraction || 0) * 100) + "%" + (text ? " · " + text : "");
    row.title = value.textContent;
  }

  function ratio(used, capacity) {
    return capacity > 0 ? (used || 0) / capacity : 0;
  }

  function seconds(value) {
    if (!value) return "0 s";
    return value < 1 ? Math.round(value * 1000) + " ms" : decimal.format(value) + " s";
  }

  function duration(total) {
    const s = Math.floor(total);
    const d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60);
    if (d) return d + " d " + h + " h";
    if (h) return h + " h " + m + " min";
    if (m) return m + " min " + (s % 60) + " s";
    return s + " s";
  }

  // --- start --------------------------------------------------------------------------------------------------

  takeKeyFromFragment();
  if (!key) key = storage("get");
  poll();
})();
