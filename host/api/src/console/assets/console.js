// jobhost console: the live parts of the server-rendered pages. No inline script anywhere (the
// Content-Security-Policy forbids it); everything the page shows comes from the server, which
// escapes it. This script only fetches fragments the server rendered, or a grid's statuses.
"use strict";

(function () {
  const STATUS = { c: "created", s: "scheduled", w: "waiting", r: "ready", x: "executing", C: "complete", F: "failed", X: "canceled" };
  // At most this often per kind of refresh, however many events arrive: updates coalesce.
  const SECTION_MS = 1000;
  const GRID_MS = 250;

  // One listener for every form with a confirmation, also those a refresh brings in.
  function confirmForms() {
    document.addEventListener("submit", function (e) {
      const form = e.target;
      if (form.dataset && form.dataset.confirm && !window.confirm(form.dataset.confirm)) e.preventDefault();
    });
  }

  // A refresher runs `work` when marked dirty, at most once per `every` ms, never two at once.
  function refresher(every, work) {
    let dirty = false, running = false, timer = null, last = 0;
    function run() {
      timer = null;
      if (running || !dirty) return;
      dirty = false; running = true; last = Date.now();
      Promise.resolve().then(work).catch(function () { dirty = true; }).then(function () {
        running = false;
        if (dirty) schedule();
      });
    }
    function schedule() {
      if (timer !== null || running) return;
      timer = setTimeout(run, Math.max(0, last + every - Date.now()));
    }
    return function mark() { dirty = true; schedule(); };
  }

  function liveSection(section) {
    const url = section.dataset.live;
    return refresher(SECTION_MS, function () {
      return fetch(url, { credentials: "same-origin" }).then(function (r) {
        if (r.status === 401) { window.location.reload(); return; }
        if (!r.ok) throw new Error(r.status);
        return r.text().then(function (html) {
          // Log panels keep the state the reader gave them across the refresh.
          const state = new Map();
          section.querySelectorAll("details").forEach(function (d) {
            const owner = d.closest("[id]");
            if (owner) state.set(owner.id, d.open);
          });
          section.innerHTML = html;
          section.querySelectorAll("details").forEach(function (d) {
            const owner = d.closest("[id]");
            if (owner && state.has(owner.id)) d.open = state.get(owner.id);
          });
        });
      });
    });
  }

  function partGrid(grid) {
    const base = grid.dataset.base;
    let codes = grid.dataset.statuses || "";
    const cells = [];
    function cell(i, code) {
      const a = document.createElement("a");
      a.href = base + i;
      a.className = "cell s-" + (STATUS[code] || "unknown");
      a.title = "part " + i + ": " + (STATUS[code] || code);
      return a;
    }
    function build() {
      const frag = document.createDocumentFragment();
      for (let i = cells.length; i < codes.length; i++) {
        const a = cell(i, codes[i]);
        cells.push(a);
        frag.appendChild(a);
      }
      grid.appendChild(frag);
    }
    build();
    function setCount(name, text) {
      const el = document.querySelector('#partcounts [data-count="' + name + '"]');
      if (el) el.textContent = text;
    }
    return refresher(GRID_MS, function () {
      return fetch(grid.dataset.src, { credentials: "same-origin" }).then(function (r) {
        if (r.status === 401) { window.location.reload(); return; }
        if (!r.ok) throw new Error(r.status);
        return r.json().then(function (g) {
          const next = g.statuses;
          for (let i = 0; i < Math.min(cells.length, next.length); i++) {
            if (next[i] !== codes[i]) {
              cells[i].className = "cell s-" + (STATUS[next[i]] || "unknown");
              cells[i].title = "part " + i + ": " + (STATUS[next[i]] || next[i]);
            }
          }
          codes = next;
          build();
          const section = grid.closest("section");
          if (section && codes.length > 0) section.hidden = false;
          const c = g.counts;
          setCount("total", String(c.total));
          setCount("completed", String(c.completed));
          setCount("failed", String(c.failed));
          setCount("canceled", String(c.canceled));
          setCount("open", String(g.open));
          setCount("done", (c.completed + c.failed + c.canceled) + " of " + c.total + " ended");
          const done = document.getElementById("partscompleted");
          if (done) done.textContent = "job:parts-completed: " + (g.partsCompletedAt || "not yet");
          grid.dataset.parentStatus = g.status;
        });
      });
    });
  }

  function live() {
    const section = document.querySelector("[data-live]");
    const grid = document.getElementById("grid");
    if (!section && !grid) return;
    const job = section ? section.dataset.job : null;
    const topics = section ? section.dataset.topics : null;
    const parent = grid ? grid.dataset.src.split("/")[3] : null;
    const markSection = section ? liveSection(section) : null;
    const markGrid = grid ? partGrid(grid) : null;
    const state = document.createElement("span");
    state.className = "livestate";
    state.textContent = "connecting…";
    const header = document.querySelector("header.top");
    if (header) header.appendChild(state);
    const source = new EventSource("/console/stream");
    source.onopen = function () {
      state.textContent = "live";
      state.classList.add("on");
      // Whatever happened between rendering and connecting.
      if (markSection) markSection();
      if (markGrid) markGrid();
    };
    source.onerror = function () {
      state.textContent = "reconnecting…";
      state.classList.remove("on");
    };
    source.onmessage = function (m) {
      let e;
      try { e = JSON.parse(m.data); } catch (_) { return; }
      if (markSection) {
        if (job ? e.jobId === job : (topics ? e.topic.indexOf(topics) === 0 : true)) markSection();
      }
      if (markGrid && (e.parentId === parent || e.jobId === parent)) markGrid();
    };
  }

  function deploy() {
    const form = document.getElementById("deploy");
    if (!form) return;
    const out = document.getElementById("deploy-result");
    form.addEventListener("submit", function (e) {
      e.preventDefault();
      const name = form.elements.name.value.trim();
      const file = form.elements.component.files[0];
      if (!file) { out.textContent = "Choose a .wasm component to deploy."; return; }
      out.textContent = "Deploying " + name + "…";
      out.className = "";
      fetch("/console/plugins/" + encodeURIComponent(name), {
        method: "PUT",
        credentials: "same-origin",
        headers: { "X-CSRF-Token": document.body.dataset.csrf, "Content-Type": "application/wasm" },
        body: file,
      }).then(function (r) {
        return r.json().catch(function () { return { ok: false, message: "The host answered " + r.status + "." }; });
      }).then(function (a) {
        out.textContent = a.message;
        out.className = a.ok ? "ok" : "error";
        if (a.ok) window.location.reload();
      }).catch(function (err) {
        out.textContent = "The host did not answer: " + err;
        out.className = "error";
      });
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    confirmForms();
    deploy();
    live();
  });
})();
