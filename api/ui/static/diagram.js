/* flowdb's process diagram: draws graph_of()'s JSON (api/ui/diagram.py) into <svg id="diagram">, laid out
   by the vendored dagre, and keeps it live over the instance's event stream.

   The page gives: <svg id="diagram" data-graph-url="..." data-stream-url="..."> (both absent on a
   definition page: the diagram is static), <script type="application/json" id="diagram-data"> with the
   graph, and dagre-3.1.4.min.js loaded before this file. Under a strict CSP: no inline style, no
   innerHTML (labels and conditions are user data: they only ever go in through textContent).

   It dispatches on document:
     "flowdb:event"  detail: each stream event's data (the events row as JSON), as it arrives;
     "flowdb:graph"  detail: the graph, after each refresh from data-graph-url has been drawn;
     "flowdb:step"   detail: {step: id}, when a node is clicked. */
(() => {
  "use strict";

  const SVG_NS = "http://www.w3.org/2000/svg";
  // Every event type flowdb writes (grep flowdb/ for them). EventSource calls a listener only for the
  // types registered by name, so a type missing here would not refresh the diagram (the 10 s poll
  // while the stream is down does not cover it).
  const EVENT_TYPES = [
    "instance.started", "instance.resumed", "instance.completed", "instance.failed", "instance.cancelled",
    "step.ready", "step.started", "step.waiting", "step.woken", "step.deferred", "step.completed",
    "step.failed", "step.skipped", "step.cancelled", "step.expanded", "step.loop_back", "step.retry_scheduled",
    "step.retry_requested", "step.restored", "step.released", "step.handed_back", "step.lease_expired",
    "step.late_result_dropped", "step.item_failed_after_its_step", "gateway.loop_exhausted",
    "approval.requested", "approval.notified", "approval.reminded", "approval.voted", "approval.decided",
    "approval.refused", "approval.expired", "approval.cancelled", "feedback.recorded",
    "budget.set", "budget.raised", "budget.exceeded", "step.error_caught", "instance.paused", "step.exhausted", "instance.rerun", "notification.sent", "notification.failed",
  ];
  // An instance in one of these is done: the page stops listening (a retry from this page reloads it).
  const FINISHED = ["completed", "failed", "cancelled"];
  const EDGE_KINDS = ["dependency", "route", "loop", "error"];
  const NODE_HEIGHT = 64;
  const NODE_MIN_WIDTH = 128;
  const NODE_PADDING = 16; // each side of the widest line
  const LABEL_CHARS = 36; // longer step names and conditions are cut (whole in the <title>)
  const EDGE_LABEL_CHARS = 40;
  const EDGE_LABEL_HEIGHT = 18;
  const REFRESH_DELAY_MS = 150; // one fetch for a burst of events
  const POLL_MS = 10000; // while the stream is down

  const svg = document.getElementById("diagram");
  const dataElement = document.getElementById("diagram-data");
  const dagre = window.dagre;
  if (!svg || !dataElement || !dagre) {
    return;
  }
  const graphUrl = svg.dataset.graphUrl || null;
  const streamUrl = svg.dataset.streamUrl || null;

  let graph = JSON.parse(dataElement.textContent);
  let drawn = null; // {signature, nodes: Map id -> {group, title, sub, status, width}}
  let renders = 0;

  function el(name, attributes, text) {
    const node = document.createElementNS(SVG_NS, name);
    for (const [key, value] of Object.entries(attributes || {})) {
      node.setAttribute(key, String(value));
    }
    if (text !== undefined) {
      node.textContent = text;
    }
    return node;
  }

  function cut(text, chars) {
    const value = String(text);
    return value.length > chars ? value.slice(0, chars - 1) + "\u2026" : value;
  }

  // A route's condition as shown on its edge: without the {{ }} around references (whole in its <title>).
  function edgeText(label) {
    return cut(String(label).replace(/\{\{\s*(.*?)\s*\}\}/g, "$1"), EDGE_LABEL_CHARS);
  }

  function statusWord(status) {
    return String(status).replace(/_/g, " ");
  }

  // A class-safe form of a status (it comes from the server, but goes into a class name).
  function statusClass(status) {
    return "status-" + String(status).replace(/[^a-z0-9_-]/gi, "");
  }

  function subLabel(node) {
    const parts = [node.type];
    if (node.round > 1) {
      parts.push("round " + node.round);
    }
    if (node.items) {
      parts.push(node.items.completed + "/" + node.items.total + " items");
    }
    return parts.join(" \u00b7 ");
  }

  function nodeTitle(node) {
    const lines = [node.id + " (" + node.type + "): " + statusWord(node.status)];
    if (node.label !== node.id) {
      lines.push(node.label);
    }
    if (node.round > 1) {
      lines.push("round " + node.round);
    }
    if (node.attempt > 1) {
      lines.push("attempt " + node.attempt + (node.max_attempts ? " of " + node.max_attempts : ""));
    }
    if (node.items) {
      const i = node.items;
      lines.push(i.completed + " of " + i.total + " items completed, " + i.failed + " failed, " + i.open + " open");
    }
    return lines.join("\n");
  }

  // Text widths as the page's font draws them; an estimate when the SVG is not rendered (hidden).
  function measurer() {
    const probe = el("text", {x: 0, y: 0, class: "diagram-probe"});
    svg.appendChild(probe);
    return {
      width(text, className, perChar) {
        probe.setAttribute("class", "diagram-probe " + className);
        probe.textContent = text;
        const measured = probe.getComputedTextLength();
        return measured > 0 ? measured : text.length * perChar;
      },
      done() {
        probe.remove();
      },
    };
  }

  function nodeWidth(measure, node) {
    // A for_each step gets room for its item count before it has one (no re-layout when it comes).
    const sub = node.for_each && !node.items ? subLabel({...node, items: {completed: 888, total: 888}}) : subLabel(node);
    const widest = Math.max(
      measure.width(cut(node.label, LABEL_CHARS), "node-label", 8.5),
      measure.width(sub, "node-sub", 7),
      measure.width(statusWord(node.status), "node-status", 7),
    );
    return Math.max(NODE_MIN_WIDTH, Math.ceil(widest) + 2 * NODE_PADDING);
  }

  function signature(g) {
    return JSON.stringify([g.nodes.map((n) => [n.id, n.label, n.type]),
      g.edges.map((e) => [e.from, e.to, e.kind, e.label])]);
  }

  // A smooth path through dagre's points: quadratic curves between the midpoints of its segments.
  function pathThrough(points) {
    if (points.length < 3) {
      return points.map((p, i) => (i ? "L" : "M") + p.x + "," + p.y).join(" ");
    }
    let d = "M" + points[0].x + "," + points[0].y;
    for (let i = 1; i < points.length - 1; i++) {
      const p = points[i];
      const next = points[i + 1];
      const end = i === points.length - 2 ? next : {x: (p.x + next.x) / 2, y: (p.y + next.y) / 2};
      d += " Q" + p.x + "," + p.y + " " + end.x + "," + end.y;
    }
    return d;
  }

  function markers() {
    const defs = el("defs");
    for (const kind of EDGE_KINDS) {
      const marker = el("marker", {
        id: "diagram-arrow-" + kind, viewBox: "0 0 10 10", refX: 9, refY: 5,
        markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse",
      });
      marker.appendChild(el("path", {d: "M0,0 L10,5 L0,10 z", class: "arrow arrow-" + kind}));
      defs.appendChild(marker);
    }
    return defs;
  }

  function drawNode(node, layout) {
    const width = layout.width;
    const group = el("g", {
      class: "node " + statusClass(node.status),
      "data-step": node.id,
      "data-status": node.status,
      transform: "translate(" + (layout.x - width / 2) + "," + (layout.y - NODE_HEIGHT / 2) + ")",
    });
    const title = el("title", {}, nodeTitle(node));
    const box = el("rect", {class: "node-box", x: 0, y: 0, width: width, height: NODE_HEIGHT, rx: 6, ry: 6});
    const label = el("text", {class: "node-label", x: width / 2, y: 22, "text-anchor": "middle"},
      cut(node.label, LABEL_CHARS));
    const sub = el("text", {class: "node-sub", x: width / 2, y: 39, "text-anchor": "middle"}, subLabel(node));
    const status = el("text", {class: "node-status", x: width / 2, y: 55, "text-anchor": "middle"},
      statusWord(node.status));
    group.append(title, box, label, sub, status);
    group.addEventListener("click", () => {
      document.dispatchEvent(new CustomEvent("flowdb:step", {detail: {step: node.id}}));
    });
    return {group, title, sub, status, width};
  }

  function drawEdgeLabel(edge, layout, width) {
    const group = el("g", {
      class: "edge-label edge-label-" + edge.kind,
      "data-from": edge.from,
      "data-to": edge.to,
      transform: "translate(" + layout.x + "," + layout.y + ")",
    });
    group.append(
      el("title", {}, edge.label),
      el("rect", {class: "edge-label-box", x: -width / 2, y: -EDGE_LABEL_HEIGHT / 2, width: width,
        height: EDGE_LABEL_HEIGHT, rx: 3, ry: 3}),
      el("text", {class: "edge-label-text", x: 0, y: 4, "text-anchor": "middle"}, edgeText(edge.label)),
    );
    return group;
  }

  // Lay the whole graph out and draw it (the first time, and when the graph's shape changed).
  function render(g) {
    const layout = new dagre.graphlib.Graph({multigraph: true});
    layout.setGraph({rankdir: "TB", nodesep: 36, ranksep: 44, edgesep: 16, marginx: 12, marginy: 12});
    const measure = measurer();
    const labelWidths = [];
    try {
      for (const node of g.nodes) {
        layout.setNode(node.id, {width: nodeWidth(measure, node), height: NODE_HEIGHT});
      }
      g.edges.forEach((edge, i) => {
        const label = {};
        if (edge.label) {
          labelWidths[i] = Math.ceil(measure.width(edgeText(edge.label), "edge-label-text", 6.5)) + 10;
          Object.assign(label, {width: labelWidths[i], height: EDGE_LABEL_HEIGHT, labelpos: "c"});
        }
        layout.setEdge(edge.from, edge.to, label, "e" + i);
      });
    } finally {
      measure.done();
    }
    dagre.layout(layout);

    const title = svg.querySelector(":scope > title");
    svg.replaceChildren(...(title ? [title] : []), markers());
    const edges = el("g", {class: "edges"});
    const labels = el("g", {class: "edge-labels"});
    const nodes = el("g", {class: "nodes"});
    g.edges.forEach((edge, i) => {
      const laid = layout.edge(edge.from, edge.to, "e" + i);
      edges.appendChild(el("path", {
        class: "edge edge-" + edge.kind, "data-from": edge.from, "data-to": edge.to,
        d: pathThrough(laid.points), "marker-end": "url(#diagram-arrow-" + edge.kind + ")",
      }));
      if (edge.label && laid.x !== undefined) {
        labels.appendChild(drawEdgeLabel(edge, laid, labelWidths[i]));
      }
    });
    const drawnNodes = new Map();
    for (const node of g.nodes) {
      const parts = drawNode(node, layout.node(node.id));
      nodes.appendChild(parts.group);
      drawnNodes.set(node.id, parts);
    }
    svg.append(edges, labels, nodes);
    const size = layout.graph();
    const width = Number.isFinite(size.width) ? Math.ceil(size.width) : 0; // no steps: an empty drawing
    const height = Number.isFinite(size.height) ? Math.ceil(size.height) : 0;
    svg.setAttribute("viewBox", "0 0 " + width + " " + height);
    svg.setAttribute("width", String(width)); // its natural size; diagram.css lets it shrink to fit
    svg.setAttribute("height", String(height));
    drawn = {signature: signature(g), nodes: drawnNodes};
    renders += 1;
    svg.setAttribute("data-ready", "true");
  }

  // Apply a refreshed graph: nodes change in place; a new shape, or a sub-label that no longer
  // fits its node, lays the whole graph out again.
  function apply(g) {
    let fits = drawn !== null && drawn.signature === signature(g);
    if (fits) {
      const measure = measurer();
      try {
        fits = g.nodes.every((node) => nodeWidth(measure, node) <= drawn.nodes.get(node.id).width);
      } finally {
        measure.done();
      }
    }
    if (!fits) {
      render(g);
    } else {
      for (const node of g.nodes) {
        const parts = drawn.nodes.get(node.id);
        parts.group.setAttribute("class", "node " + statusClass(node.status));
        parts.group.setAttribute("data-status", node.status);
        parts.title.textContent = nodeTitle(node);
        parts.sub.textContent = subLabel(node);
        parts.status.textContent = statusWord(node.status);
      }
    }
    graph = g;
    document.dispatchEvent(new CustomEvent("flowdb:graph", {detail: g}));
    if (FINISHED.includes(g.instance_status)) {
      stop("finished");
    }
  }

  // -- live updates ------------------------------------------------------------------------------------
  let refreshTimer = null;
  let fetching = null;
  let fetchAgain = false;

  async function refresh() {
    if (!graphUrl) {
      return;
    }
    if (fetching) {
      fetchAgain = true; // an event came in while a fetch was under way: read once more after it
      return fetching;
    }
    fetching = (async () => {
      try {
        const response = await fetch(graphUrl, {
          credentials: "same-origin", cache: "no-store", headers: {Accept: "application/json"},
        });
        if (response.redirected && new URL(response.url).pathname === "/ui/login") {
          stop("signed-out"); // the session ended: nothing more can be read until the reader signs in again
          document.dispatchEvent(new CustomEvent("flowdb:signed-out"));
        } else if (response.ok) {
          apply(await response.json());
        }
      } catch (error) {
        // A network hiccup or a non-JSON answer: the next event or poll reads again.
      } finally {
        fetching = null;
        if (fetchAgain) {
          fetchAgain = false;
          scheduleRefresh();
        }
      }
    })();
    return fetching;
  }

  function scheduleRefresh() {
    if (refreshTimer === null) {
      refreshTimer = setTimeout(() => {
        refreshTimer = null;
        refresh();
      }, REFRESH_DELAY_MS);
    }
  }

  let source = null;
  let pollTimer = null;

  function setLive(state) {
    svg.setAttribute("data-live", state);
  }

  function startPolling() {
    if (pollTimer === null) {
      pollTimer = setInterval(() => {
        refresh();
        if (source && source.readyState === EventSource.CLOSED) {
          connect(); // refused for good (a 503, an expired session): the browser will not retry it
        }
      }, POLL_MS);
    }
  }

  function stopPolling() {
    if (pollTimer !== null) {
      clearInterval(pollTimer);
      pollTimer = null;
    }
  }

  function onEvent(message) {
    let detail;
    try {
      detail = JSON.parse(message.data);
    } catch (error) {
      detail = {type: message.type, data: message.data};
    }
    document.dispatchEvent(new CustomEvent("flowdb:event", {detail}));
    scheduleRefresh();
  }

  let stopped = false;

  // No more listening or polling: the instance finished, or the session ended.
  function stop(why) {
    stopped = true;
    if (source) {
      source.close();
      source = null;
    }
    stopPolling();
    if (refreshTimer !== null) {
      clearTimeout(refreshTimer);
      refreshTimer = null;
    }
    setLive(why);
  }

  function connect() {
    if (stopped) {
      return;
    }
    if (source) {
      source.close();
    }
    setLive("connecting");
    source = new EventSource(streamUrl); // same origin: the session cookie goes with it
    source.addEventListener("message", onEvent);
    for (const type of EVENT_TYPES) {
      source.addEventListener(type, onEvent);
    }
    source.addEventListener("open", () => {
      setLive("open");
      stopPolling();
      refresh(); // what changed between the page's rendering and the stream's start
    });
    source.addEventListener("error", () => {
      setLive("polling");
      startPolling();
    });
  }

  render(graph);
  if (graphUrl && streamUrl && !FINISHED.includes(graph.instance_status)) {
    connect();
    window.addEventListener("pagehide", () => {
      if (source) {
        source.close();
        source = null;
      }
      stopPolling();
    });
    window.addEventListener("pageshow", (event) => {
      if (event.persisted && !stopped) {
        connect(); // back from the back/forward cache: the stream was closed on the way out
      }
    });
  }

  window.flowdbDiagram = Object.freeze({
    refresh,
    graph: () => graph,
    renders: () => renders,
  });
})();
