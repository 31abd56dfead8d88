// The status page refreshes itself from /api/status (text only: textContent everywhere).
"use strict";
(function () {
  const PERIOD_MS = 3000;
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function set(id, text) { const e = document.getElementById(id); if (e) e.textContent = String(text); }
  function list(id, entries, build) {
    const ul = document.getElementById(id);
    ul.replaceChildren();
    if (!entries.length) { ul.append(el("li", "none", "None.")); return; }
    for (const x of entries) ul.append(build(x));
  }
  function retryForm(job) {
    const f = el("form", "inline");
    f.method = "post";
    f.action = "/api/retry";
    for (const [k, v] of [["csrf_token", watcher.csrf()], ["job", job]]) {
      const i = el("input"); i.type = "hidden"; i.name = k; i.value = v; f.append(i);
    }
    const b = el("button", null, "Retry"); b.type = "submit"; f.append(b);
    return f;
  }
  function render(r) {
    const d = r.daemon;
    set("daemon", d && d.running ? "running (pid " + d.pid + ")" + (d.responding ? "" : ", not responding") : "not running");
    set("model", r.model.backend + ": " + r.model.id);
    set("device", r.model.device);
    set("images", r.images);
    set("rate", r.images_per_second);
    set("sidecars-pending", r.sidecars_pending);
    const q = document.getElementById("queue");
    q.replaceChildren();
    for (const [state, n] of Object.entries(r.queue)) {
      const tr = el("tr"); tr.append(el("th", null, state), el("td", null, n)); q.append(tr);
    }
    list("folders", d ? d.folders : [], (f) => {
      const li = el("li");
      li.append(el("span", "path", f.path), " ", el("span", "badge", f.state || ""));
      if (f.error) li.append(" ", el("span", "reason", f.error));
      return li;
    });
    list("failures", r.failures, (f) => {
      const li = el("li");
      li.append(el("span", "path", f.path), ": ", el("span", "reason", f.reason));
      if (f.job) li.append(" ", retryForm(f.job));
      return li;
    });
    list("skipped", r.skipped_list || [], (s) => {
      const li = el("li");
      li.append(el("span", "path", s.path), ": ", el("span", "reason", s.reason));
      return li;
    });
  }
  async function tick() {
    try {
      const res = await fetch("/api/status", { headers: { Accept: "application/json" } });
      if (res.ok) render(await res.json());
    } catch (e) { /* the daemon restarting: try again next time */ }
    setTimeout(tick, PERIOD_MS);
  }
  setTimeout(tick, PERIOD_MS);
})();
