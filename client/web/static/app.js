// multistream playground: one WebSocket to the app, which relays Triton's gRPC stream.
// No framework and no build step; state the tests read lives in data-* attributes.
"use strict";

const $ = (id) => document.getElementById(id);
const els = {
  status: $("status"), error: $("error"), prompt: $("prompt"), start: $("start"), stop: $("stop"),
  session: $("session"), input: $("input"), send: $("send"), inputs: $("inputs"), panes: $("panes"),
};
// The settings form is built from the app's /api/params (the client library's request
// options); these are only the playground's starting values, for options it has.
const PRESETS = { max_tokens: "160", temperature: "0.7", top_p: "0.95", top_k: "40",
                  reasoning_streams: "1", reasoning_budget: "160", attention_mode: "isolated" };
let PARAMS = [];  // option names, in the table's order

let ws = null;
let running = false;
let retryMs = 500;
const pendingAcks = [];  // <li> of inputs waiting for the server's answer, in send order

function showError(message, kind) {
  els.error.textContent = message;
  els.error.dataset.kind = kind || "";
  els.error.hidden = false;
}
function clearError() { els.error.hidden = true; els.error.textContent = ""; els.error.dataset.kind = ""; }

function setStatus(ok, message) {
  els.status.textContent = ok ? "Triton ready" : "Triton unavailable";
  els.status.title = message || "";
  els.status.className = "status " + (ok ? "ok" : "down");
  els.status.dataset.ok = ok ? "true" : "false";
}

function setRunning(on, outcome) {
  running = on;
  els.start.disabled = on;
  els.stop.disabled = !on;
  els.send.disabled = !on;
  document.body.dataset.session = on ? "running" : (outcome || "");
}

function fmt(x, digits) { return x === null || x === undefined ? "–" : Number(x).toFixed(digits); }

function paneFor(stream) {
  let pane = els.panes.querySelector(`.pane[data-stream="${CSS.escape(stream)}"]`);
  if (pane) return pane;
  const reasoning = stream.startsWith("reasoning");
  pane = document.createElement("article");
  pane.className = "pane " + (reasoning ? "reasoning" : "output");
  pane.dataset.stream = stream;
  pane.id = "pane-" + stream.replace(/[^a-z0-9]+/gi, "-");
  pane.innerHTML = `<header><h2></h2><span class="state"></span></header>
    <div class="text" aria-live="polite"></div>
    <footer class="stats"><span class="ttft">TTFT –</span><span class="tokens">0 tok</span><span class="rate">– tok/s</span></footer>`;
  pane.querySelector("h2").textContent = reasoning ? "thinking · " + stream : stream;
  els.panes.appendChild(pane);
  return pane;
}

function resetPanes(nReasoning) {
  for (const pane of [...els.panes.querySelectorAll(".pane")]) {
    if (pane.dataset.stream !== "output") pane.remove();
  }
  for (let i = 0; i < nReasoning; i++) paneFor(`reasoning/${i}`);
  for (const pane of els.panes.querySelectorAll(".pane")) {
    pane.querySelector(".text").textContent = "";
    setPaneState(pane, "waiting");
    setStats(pane, { ttft_ms: null, tokens: 0, tokens_per_s: null });
  }
  paneFor("output").querySelector("h2").textContent = "answer";
}

function setPaneState(pane, state) {
  const badge = pane.querySelector(".state");
  badge.textContent = state;
  badge.dataset.state = state;
  pane.dataset.state = state;
}

function setStats(pane, s) {
  pane.querySelector(".ttft").textContent = "TTFT " + (s.ttft_ms == null ? "–" : fmt(s.ttft_ms, 0) + " ms");
  pane.querySelector(".tokens").textContent = `${s.tokens ?? 0} tok`;
  pane.querySelector(".rate").textContent = fmt(s.tokens_per_s, 1) + " tok/s";
  pane.dataset.tokens = String(s.tokens ?? 0);
}

function buildParams(table) {
  const grid = $("params");
  grid.textContent = "";
  for (const p of table) {
    const label = document.createElement("label");
    label.title = p.help || "";
    label.append(p.label + " ");
    let field;
    if (p.choices) {
      field = document.createElement("select");
      // The blank first option means the server's default.
      field.append(new Option("default", ""), ...p.choices.map((c) => new Option(c, c)));
    } else {
      field = document.createElement("input");
      field.type = p.type === "str" ? "text" : "number";
      if (p.type === "int") field.step = "1";
      if (p.type === "float") field.step = "0.05";
      if (p.min !== null) field.min = String(p.min);
      if (p.max !== null) field.max = String(p.max);
      field.placeholder = p.default === null ? "server default" : String(p.default);
    }
    field.id = p.name;
    field.value = PRESETS[p.name] ?? "";
    label.append(field);
    grid.append(label);
  }
  PARAMS = table.map((p) => p.name);
}

function setMax(name, value) { const el = $(name); if (el) el.max = value; }

function params() {
  const out = {};
  for (const name of PARAMS) {
    const v = $(name).value;
    if (v !== "") out[name] = v;
  }
  return out;
}

function start() {
  const prompt = els.prompt.value.trim();
  if (!prompt) { showError("Type a prompt first."); return; }
  if (!ws || ws.readyState !== WebSocket.OPEN) { showError("Not connected to the playground app."); return; }
  clearError();
  resetPanes(parseInt($("reasoning_streams")?.value || "0", 10) || 0);
  els.inputs.textContent = "";
  pendingAcks.length = 0;
  setRunning(true);
  els.session.textContent = "";
  ws.send(JSON.stringify({ type: "start", prompt, params: params() }));
}

function sendInput() {
  const text = els.input.value;
  if (!text.trim() || !running) return;
  const li = document.createElement("li");
  li.textContent = text;
  li.dataset.state = "sent";
  els.inputs.appendChild(li);
  pendingAcks.push(li);
  els.input.value = "";
  ws.send(JSON.stringify({ type: "input", text }));
}

function stop() {
  if (!running) return;
  els.stop.disabled = true;
  ws.send(JSON.stringify({ type: "stop" }));
}

function onMessage(msg) {
  switch (msg.type) {
    case "status":
      setStatus(msg.ok, msg.message);
      // A down/up status replaces an earlier connectivity message, never a request error.
      if (!msg.ok) showError(msg.message, "status");
      else if (["status", "connection", "app"].includes(els.error.dataset.kind)) clearError();
      if (msg.limits && msg.limits.max_reasoning_streams !== undefined) {
        setMax("reasoning_streams", msg.limits.max_reasoning_streams);
      }
      if (msg.limits && msg.limits.max_tokens_limit !== undefined) {
        setMax("max_tokens", msg.limits.max_tokens_limit);
        setMax("reasoning_budget", msg.limits.max_tokens_limit);
      }
      break;
    case "started":
      els.session.textContent = msg.session_id;
      document.body.dataset.sessionId = msg.session_id;
      for (const pane of els.panes.querySelectorAll(".pane")) setPaneState(pane, "waiting");
      break;
    case "delta": {
      if (msg.kind === "user") {  // echo of the User channel: the model read our input
        const read = [...els.inputs.querySelectorAll('li[data-state="accepted"]')].pop();
        if (read) read.dataset.read = String(Number(read.dataset.read || 0) + (msg.n_tokens || 0));
        if (read) read.title = `the model read ${read.dataset.read} token(s) of it`;
        break;
      }
      const pane = paneFor(msg.stream);
      const box = pane.querySelector(".text");
      // Streams often open with newlines; leading blank lines only push the text down.
      const text = box.textContent ? msg.text : (msg.text || "").trimStart();
      if (text) box.append(document.createTextNode(text));
      setStats(pane, msg);
      setPaneState(pane, msg.finish_reason || "running");
      break;
    }
    case "input_ack": {
      const li = msg.queued ? pendingAcks[0] : pendingAcks.shift();
      if (!li) break;
      if (msg.queued) { li.dataset.state = "queued"; break; }
      li.dataset.state = msg.accepted ? "accepted" : "rejected";
      if (msg.message) li.dataset.message = msg.message;
      if (msg.accepted) {
        const mark = document.createElement("span");
        mark.className = "user";
        mark.textContent = "you: " + msg.text;
        paneFor("output").querySelector(".text").append(mark);
      }
      break;
    }
    case "stop_ack":
      if (msg.via === "local" && msg.message) els.session.textContent += " (stopped locally)";
      break;
    case "done":
      for (const [stream, reason] of Object.entries(msg.finish_reasons || {})) {
        const pane = paneFor(stream);
        setPaneState(pane, reason);
        if (msg.ttft_s && msg.ttft_s[stream] !== undefined) {  // the library's Done summary
          setStats(pane, { ttft_ms: msg.ttft_s[stream] * 1000, tokens: msg.tokens[stream],
                           tokens_per_s: msg.tokens_per_s[stream] });
        } else if (msg.stats && msg.stats[stream]) {            // a stop the app summarised
          setStats(pane, msg.stats[stream]);
        }
      }
      document.body.dataset.outcome = msg.outcome;
      break;
    case "error":
      showError(msg.message, msg.kind);
      for (const pane of els.panes.querySelectorAll(".pane")) {
        if (["waiting", "running"].includes(pane.dataset.state)) setPaneState(pane, "error");
      }
      document.body.dataset.outcome = "error";
      break;
    case "ended":
      setRunning(false, msg.outcome);
      for (const li of pendingAcks.splice(0)) { li.dataset.state = "rejected"; li.dataset.message = "session ended"; }
      break;
  }
}

function connect() {
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  ws = new WebSocket(`${proto}//${location.host}/ws`);
  ws.onopen = () => { retryMs = 500; if (els.error.dataset.kind === "app") clearError(); };
  ws.onmessage = (e) => onMessage(JSON.parse(e.data));
  ws.onclose = () => {
    if (running) setRunning(false, "error");
    els.status.textContent = "app disconnected";
    els.status.className = "status down";
    els.status.dataset.ok = "false";
    showError("Lost the connection to the playground app; reconnecting…", "app");
    setTimeout(connect, retryMs);
    retryMs = Math.min(retryMs * 2, 8000);
  };
}

els.start.addEventListener("click", start);
els.stop.addEventListener("click", stop);
els.send.addEventListener("click", sendInput);
els.input.addEventListener("keydown", (e) => { if (e.key === "Enter") { e.preventDefault(); sendInput(); } });
els.prompt.addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) start(); });
// Re-check Triton every 10 s while idle, so "server down" / "back up" shows without a reload.
setInterval(() => { if (ws && ws.readyState === WebSocket.OPEN && !running) ws.send(JSON.stringify({ type: "ping" })); }, 10000);
// The form first, so "Start" never sends settings that are not there yet.
fetch("/api/params")
  .then((r) => { if (!r.ok) throw new Error(`HTTP ${r.status}`); return r.json(); })
  .then(buildParams)
  .catch((e) => showError(`Could not load the settings (${e.message}); starting with server defaults.`, "settings"))
  .finally(connect);
