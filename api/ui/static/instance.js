// The instance page's live part: when the diagram's event stream reports a change (diagram.js sends
// `flowdb:graph` after it re-read the statuses), read the page's live section again and swap it in,
// keeping the step details a reader has open. The HTML comes from this server, already escaped.
(function () {
  "use strict";
  const live = document.getElementById("live");
  if (!live) return;
  const url = live.dataset.liveUrl;
  let timer = null;
  let busy = false;
  let again = false;

  async function refresh() {
    if (busy) { again = true; return; }
    busy = true;
    try {
      const response = await fetch(url, { credentials: "same-origin", headers: { Accept: "text/html" } });
      if (!response.ok) return;
      const html = await response.text();
      const open = new Set(Array.from(live.querySelectorAll("details[open]")).map((d) => d.id).filter(Boolean));
      const parsed = new DOMParser().parseFromString("<div>" + html + "</div>", "text/html");
      const fresh = parsed.body.firstElementChild;
      if (!fresh) return;
      fresh.querySelectorAll("details").forEach((d) => { if (d.id && open.has(d.id)) d.open = true; });
      live.replaceChildren(...Array.from(fresh.childNodes));
      live.dispatchEvent(new CustomEvent("flowdb:live", { bubbles: true }));
    } catch (error) {
      // The next change tries again; the page keeps what it shows.
    } finally {
      busy = false;
      if (again) { again = false; schedule(); }
    }
  }

  function schedule() {
    if (timer !== null) clearTimeout(timer);
    timer = setTimeout(() => { timer = null; refresh(); }, 200);
  }

  document.addEventListener("flowdb:graph", schedule);
})();
