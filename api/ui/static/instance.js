// The instance page's live parts: when the diagram's event stream reports a change (diagram.js sends
// `flowdb:graph` after it re-read the statuses), read /ui/instances/N/live again and swap in each part
// marked data-live-part (the summary; the steps and the timeline) by its id, keeping the step details
// a reader has open. The HTML comes from this server, escaped by its templates.
(function () {
  "use strict";
  const root = document.getElementById("instance");
  if (!root) return;
  const url = root.dataset.liveUrl;
  const MIN_GAP_MS = 1000; // at most one read a second, however fast events come
  let timer = null;
  let busy = false;
  let again = false;
  let last = 0;

  function swap(fresh) {
    const open = new Set(Array.from(root.querySelectorAll("details[open]")).map((d) => d.id).filter(Boolean));
    fresh.querySelectorAll("details").forEach((d) => { if (d.id && open.has(d.id)) d.open = true; });
    fresh.querySelectorAll("[data-live-part]").forEach((part) => {
      const current = part.id && document.getElementById(part.id);
      if (current) current.replaceWith(document.adoptNode(part));
    });
  }

  async function refresh() {
    if (busy) { again = true; return; }
    busy = true;
    last = Date.now();
    try {
      const response = await fetch(url, { credentials: "same-origin", headers: { Accept: "text/html" } });
      if (!response.ok) return;
      swap(new DOMParser().parseFromString(await response.text(), "text/html"));
      root.dispatchEvent(new CustomEvent("flowdb:live", { bubbles: true }));
    } catch (error) {
      // The next change tries again; the page keeps what it shows.
    } finally {
      busy = false;
      if (again) { again = false; schedule(); }
    }
  }

  function schedule() {
    if (timer !== null) return;
    const wait = Math.max(100, last + MIN_GAP_MS - Date.now());
    timer = setTimeout(() => { timer = null; refresh(); }, wait);
  }

  function signedOut() {
    const note = document.createElement("p");
    note.className = "error";
    note.setAttribute("role", "alert");
    const link = document.createElement("a");
    link.href = "/ui/login?next=" + encodeURIComponent(location.pathname);
    link.textContent = "Sign in again";
    note.append("Your session has ended; this page no longer follows the instance. ", link);
    root.prepend(note);
  }

  document.addEventListener("flowdb:graph", schedule);
  document.addEventListener("flowdb:signed-out", signedOut, { once: true });
})();
