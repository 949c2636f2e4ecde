// Small time-series charts drawn as SVG from a rolling window kept in memory.

import { svg } from './dom.js';

const W = 320;
const H = 90;
const PAD = { left: 30, right: 6, top: 6, bottom: 14 };

export class LineChart {
  /** series: [{key, colour}]; fixedMax: a y-axis ceiling (e.g. 100 for percentages) or null to fit. */
  constructor(root, series, { windowS = 600, fixedMax = null, unit = '' } = {}) {
    this.root = root;
    this.series = series;
    this.windowS = windowS;
    this.fixedMax = fixedMax;
    this.unit = unit;
    this.points = []; // {t, values}
  }

  push(values, t = Date.now()) {
    this.points.push({ t, values });
    const oldest = t - this.windowS * 1000;
    while (this.points.length && this.points[0].t < oldest) this.points.shift();
    this.render(t);
  }

  render(now) {
    const innerW = W - PAD.left - PAD.right;
    const innerH = H - PAD.top - PAD.bottom;
    let max = this.fixedMax;
    if (max == null) {
      max = 1;
      for (const p of this.points) for (const s of this.series) max = Math.max(max, p.values[s.key] ?? 0);
      max = niceCeiling(max);
    }
    // Until the window has filled, the x axis spans what there is (at least half a minute).
    const spanMs = Math.min(this.windowS * 1000, Math.max(30_000, now - (this.points[0]?.t ?? now)));
    const x = (t) => PAD.left + innerW * (1 - (now - t) / spanMs);
    const y = (v) => PAD.top + innerH * (1 - Math.min(v, max) / max);
    const nodes = [];
    for (const frac of [0, 0.5, 1]) {
      const gy = PAD.top + innerH * (1 - frac);
      nodes.push(svg('line', { class: 'grid-line', x1: PAD.left, x2: W - PAD.right, y1: gy, y2: gy }));
      nodes.push(svg('text', { class: 'axis', x: PAD.left - 4, y: gy + 3, 'text-anchor': 'end' }, label(max * frac, this.unit)));
    }
    const span = spanMs >= 90_000 ? `−${Math.round(spanMs / 60_000)} min` : `−${Math.round(spanMs / 1000)} s`;
    nodes.push(svg('text', { class: 'axis', x: PAD.left, y: H - 2 }, span));
    nodes.push(svg('text', { class: 'axis', x: W - PAD.right, y: H - 2, 'text-anchor': 'end' }, 'now'));
    for (const s of this.series) {
      const pts = this.points.filter((p) => p.values[s.key] != null);
      if (!pts.length) continue;
      const line = pts.map((p) => `${x(p.t).toFixed(1)},${y(p.values[s.key]).toFixed(1)}`).join(' ');
      if (s.area) {
        const base = y(0).toFixed(1);
        nodes.push(svg('polygon', { class: 'area', fill: s.colour,
          points: `${x(pts[0].t).toFixed(1)},${base} ${line} ${x(pts.at(-1).t).toFixed(1)},${base}` }));
      }
      nodes.push(svg('polyline', { class: 'series', stroke: s.colour, points: line, 'data-series': s.key }));
    }
    this.root.replaceChildren(...nodes);
  }
}

function niceCeiling(v) {
  const exp = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * exp) return m * exp;
  return 10 * exp;
}

function label(v, unit) {
  const text = v >= 1000 ? `${(v / 1000).toFixed(v >= 10000 ? 0 : 1)}k` : Number.isInteger(v) ? `${v}` : v.toFixed(1);
  return unit ? `${text}${unit}` : text;
}
