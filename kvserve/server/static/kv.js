// The live KV-cache view: polls /v1/kv/snapshot while the page is visible and draws the block pool, the
// requests' block tables, recent events and charts of the engine's load over time.
import { getJson } from "./api.js";

const $ = (id) => document.getElementById(id);
const HISTORY = 120; // samples kept per chart
const FREE = "#2b3138", CACHED = "#3c5a78", RESIDUAL = "#e5c07b";

// A stable colour per request id.
export function requestColor(id) {
  let hash = 0;
  for (const char of id) hash = (hash * 31 + char.charCodeAt(0)) | 0;
  return `hsl(${Math.abs(hash) % 360}, 65%, 58%)`;
}

export class KvView {
  constructor(intervalMs = 500) {
    this.intervalMs = intervalMs;
    this.series = { usage: [], running: [], waiting: [], throughput: [], ttft: [], itl: [] };
    this.previous = null; // the last snapshot, for differences
    this.events = [];
    this.latest = null; // exposed for tests and the console
  }

  start() {
    const tick = async () => {
      if (document.visibilityState === "visible") {
        try {
          this.update(await getJson("/v1/kv/snapshot"));
        } catch (error) {
          $("kv-summary").textContent = `(${error.message})`;
        }
      }
      setTimeout(tick, this.intervalMs);
    };
    tick();
  }

  update(snapshot) {
    this.latest = snapshot;
    const owners = this.owners(snapshot);
    const counts = this.count(snapshot);
    for (const [name, value] of Object.entries(counts)) $(`kv-${name}`).textContent = value;
    const stats = snapshot.stats;
    $("kv-summary").textContent = `${snapshot.num_blocks} blocks of ${snapshot.block_size} tokens, ` +
      `${snapshot.kv_cache_dtype}` + (snapshot.kv_window ? `, sinks ${snapshot.kv_window.sinks} + window ` +
      `${snapshot.kv_window.window}` : "");
    $("engine-status").textContent = `running ${stats.num_running} · waiting ${stats.num_waiting} · ` +
      `KV ${(100 * stats.kv_cache_usage).toFixed(1)}%`;
    this.drawGrid(snapshot, owners);
    this.fillTable(snapshot);
    this.record(snapshot);
    this.previous = snapshot;
  }

  // block id -> the first request whose table holds it
  owners(snapshot) {
    const owners = new Map();
    for (const request of snapshot.requests) {
      for (const block of request.block_table) {
        if (block >= 0 && !owners.has(block)) owners.set(block, request);
      }
    }
    return owners;
  }

  count(snapshot) {
    const cached = new Set(snapshot.cached_blocks);
    const refs = snapshot.ref_counts;
    const requests = snapshot.requests;
    return {
      free: refs.filter((ref, block) => ref === 0 && !cached.has(block)).length,
      cached: refs.filter((ref, block) => ref === 0 && cached.has(block)).length,
      used: refs.filter((ref) => ref > 0).length,
      shared: refs.filter((ref) => ref > 1).length,
      residual: requests.filter((request) => request.residual_block !== null).length,
      evicted: requests.reduce((sum, request) => sum + request.block_table.filter((b) => b < 0).length, 0),
      preemptions: snapshot.stats.num_preemptions,
    };
  }

  drawGrid(snapshot, owners) {
    const canvas = $("kv-grid");
    const n = snapshot.num_blocks;
    const cell = Math.max(2, Math.min(24, Math.floor(Math.sqrt((canvas.width * 200) / n))));
    const columns = Math.floor(canvas.width / cell);
    const height = Math.ceil(n / columns) * cell;
    if (canvas.height !== height) canvas.height = height;
    const context = canvas.getContext("2d");
    context.clearRect(0, 0, canvas.width, canvas.height);
    const cached = new Set(snapshot.cached_blocks);
    const residual = new Set(snapshot.requests.map((r) => r.residual_block).filter((b) => b !== null));
    const gap = cell > 4 ? 1 : 0;
    for (let block = 0; block < n; block++) {
      const x = (block % columns) * cell, y = Math.floor(block / columns) * cell;
      const refs = snapshot.ref_counts[block];
      const owner = owners.get(block);
      context.fillStyle = refs > 0 ? (owner ? requestColor(owner.id) : "#888") : cached.has(block) ? CACHED : FREE;
      context.fillRect(x, y, cell - gap, cell - gap);
      if (refs > 1 && cell >= 4) { // shared by several requests: a white frame
        context.strokeStyle = "#fff";
        context.lineWidth = Math.max(1, cell / 10);
        context.strokeRect(x + 1, y + 1, cell - gap - 2, cell - gap - 2);
      }
      if (residual.has(block) && cell >= 4) {
        context.fillStyle = RESIDUAL;
        context.fillRect(x, y + cell - gap - Math.max(1, cell / 4), cell - gap, Math.max(1, cell / 4));
      }
    }
  }

  fillTable(snapshot) {
    const rows = snapshot.requests.map((request) => {
      const tr = document.createElement("tr");
      const evicted = request.block_table.filter((b) => b < 0).length;
      const held = request.block_table.filter((b) => b >= 0);
      const cells = [
        request.id, request.status,
        `${request.num_computed_tokens} / ${request.num_prompt_tokens + request.num_output_tokens}`,
        request.num_cached_tokens,
        held.join(" ") + (evicted ? ` (${evicted} evicted)` : "") +
          (request.residual_block !== null ? ` (residual ${request.residual_block})` : ""),
      ];
      for (const [i, value] of cells.entries()) {
        const td = document.createElement("td");
        if (i === 0) {
          const swatch = document.createElement("span");
          swatch.className = "swatch";
          swatch.style.background = requestColor(request.id);
          td.append(swatch);
        }
        if (i === 4) td.className = "blocks";
        td.append(String(value));
        tr.append(td);
      }
      return tr;
    });
    $("kv-requests").querySelector("tbody").replaceChildren(...rows);
  }

  record(snapshot) {
    const stats = snapshot.stats, previous = this.previous;
    const push = (name, value) => {
      this.series[name].push(value);
      if (this.series[name].length > HISTORY) this.series[name].shift();
    };
    push("usage", 100 * stats.kv_cache_usage);
    push("running", stats.num_running);
    push("waiting", stats.num_waiting);
    push("throughput", stats.generation_throughput);
    const mean = (name) => {
      if (!previous) return null;
      const count = snapshot.latency[`${name}_count`] - previous.latency[`${name}_count`];
      return count > 0 ? (1000 * (snapshot.latency[`${name}_sum`] - previous.latency[`${name}_sum`])) / count : null;
    };
    push("ttft", mean("ttft"));
    push("itl", mean("itl"));
    if (previous && stats.num_preemptions > previous.stats.num_preemptions) {
      this.event(`preempted ${stats.num_preemptions - previous.stats.num_preemptions} request(s): ` +
                 "blocks ran out, the newest running request gave its blocks back and will recompute");
    }
    drawChart($("chart-usage"), [[this.series.usage, "#61afef"]], 100);
    drawChart($("chart-load"), [[this.series.running, "#98c379"], [this.series.waiting, "#e06c75"]]);
    drawChart($("chart-throughput"), [[this.series.throughput, "#c678dd"]]);
    drawChart($("chart-latency"), [[this.series.ttft, "#e5c07b"], [this.series.itl, "#56b6c2"]]);
  }

  event(text) {
    this.events.unshift(`${new Date().toLocaleTimeString()} ${text}`);
    this.events.length = Math.min(this.events.length, 3);
    $("kv-events").textContent = this.events.join(" | ");
  }
}

// Lines of [values, colour] over the same x axis, scaled to `top` (or their maximum); nulls are gaps.
function drawChart(canvas, lines, top = null) {
  const context = canvas.getContext("2d");
  const { width, height } = canvas;
  context.clearRect(0, 0, width, height);
  const values = lines.flatMap(([series]) => series.filter((v) => v !== null));
  const max = top ?? Math.max(1e-9, ...values) * 1.1;
  context.fillStyle = "#8b949e";
  context.font = "10px sans-serif";
  context.fillText(max >= 10 ? max.toFixed(0) : max.toPrecision(2), 2, 10);
  for (const [series, colour] of lines) {
    context.strokeStyle = colour;
    context.beginPath();
    let drawing = false;
    series.forEach((value, i) => {
      if (value === null) { drawing = false; return; }
      const x = (i / (HISTORY - 1)) * width, y = height - (value / max) * (height - 12);
      if (drawing) context.lineTo(x, y); else context.moveTo(x, y);
      drawing = true;
    });
    context.stroke();
  }
}

// kv-memory's table for the loaded model: bytes per token of its attention and its equivalents, per KV dtype.
export async function showKvMemory() {
  const report = await getJson("/v1/kv/memory");
  const dtypes = Object.keys(report.kv_cache_dtypes);
  const table = document.createElement("table");
  const head = table.createTHead().insertRow();
  for (const title of ["attention", "KV elements / token / layer", ...dtypes.map((d) => `${d} B/token`)]) {
    head.append(Object.assign(document.createElement("th"), { textContent: title }));
  }
  const body = table.createTBody();
  for (const row of report.attention) {
    const tr = body.insertRow();
    const name = row.attention + (row.is_real ? " (this model)" : "");
    for (const value of [name, row.elements_per_token_per_layer, ...dtypes.map((d) => row.bytes_per_token[d])]) {
      tr.insertCell().textContent = typeof value === "number" ? value.toLocaleString() : value;
    }
  }
  $("kv-memory-table").replaceChildren(table);
}
