// The instance page's live parts: when the diagram's event stream reports a change (diagram.js sends
// `flowdb:graph` after it re-read the statuses), read /ui/instances/N/live again and swap in each part
// marked data-live-part (the summary; the steps and the timeline) by its id, keeping the step details
// a reader has open. The HTML comes from this server, escaped by its templates.
(function () {
  "use strict";
  const root = document.getElementById("instance");
  if (!root) return;
  const url = root.dataset.liveUrl;
  let timer = null;
  let busy = false;
  let again = false;

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
    if (timer !== null) clearTimeout(timer);
    timer = setTimeout(() => { timer = null; refresh(); }, 100);
  }

  document.addEventListener("flowdb:graph", schedule);
})();
