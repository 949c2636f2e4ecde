// The map of China: outline, cities, clusters, one card per hub with its utilization by
// architecture, and the live allocation arcs from a job's origin to the cluster of its site.

import { HU_LINE, ISLANDS, MAINLAND } from './china.js';
import { el, svg } from './dom.js';
import { Flows } from './flows.js';

export const ARCHS = ['CPU', 'GPU', 'ASIC', 'FPGA'];
export const ARCH_COLOURS = { CPU: '#5aa9ff', GPU: '#3ddc97', ASIC: '#ffb347', FPGA: '#c58cff' };

// Equirectangular projection, longitudes shrunk by cos(36°) so mid-China keeps its shape.
const LON0 = 72;
const LAT0 = 54.5;
const KY = 16;
const KX = KY * Math.cos((36 * Math.PI) / 180);
export const project = ([lon, lat]) => [(lon - LON0) * KX, (LAT0 - lat) * KY];

// Where each hub's card sits (top-left, in map units): in the sea for the east, over the sparse
// far west for the west, so cards never hide the clusters or the eastern cities.
const CARD_W = 156;
const CARD_H = 82;
const CARD_AT = {
  jingjinji: [664, 214], yangtze: [664, 322], guangdong: [664, 432], neimenggu: [430, 94],
  ningxia: [236, 186], gansu: [236, 290], chengyu: [218, 430], guizhou: [330, 514],
};
// Cities named on the map; the rest are dots with a tooltip.
const NAMED_CITIES = new Set(['beijing', 'shanghai', 'guangzhou', 'shenzhen', 'chengdu', 'wuhan', 'xian',
  'urumqi', 'lhasa', 'harbin', 'hangzhou', 'kunming']);
export const VIEW = [830, 600]; // the SVGs' viewBox

const path = (points) => `M${points.map((p) => project(p).map((v) => v.toFixed(1)).join(',')).join('L')}Z`;

export class ChinaMap {
  /** base: SVG under the arcs (land, cities); root: SVG over them (hub cards, clusters). */
  constructor(base, canvas, root, { onHub, onCluster }) {
    this.base = base;
    this.flows = new Flows(canvas, ...VIEW);
    this.root = root;
    this.onHub = onHub;
    this.onCluster = onCluster;
    this.places = new Map(); // origin name -> [lon, lat]
    this.clusters = new Map(); // cluster id -> {lon, lat, hub, node}
    this.hubFirstCluster = new Map();
    this.hubCards = new Map();
  }

  setPlaces({ hubs, clusters, cities }) {
    const root = this.root;
    root.replaceChildren();
    this.base.replaceChildren();
    const base = svg('g', { class: 'base' });
    base.append(svg('path', { class: 'land', d: path(MAINLAND) }));
    for (const island of ISLANDS) base.append(svg('path', { class: 'land', d: path(island) }));
    const [h1, h2] = HU_LINE.map(project);
    base.append(svg('line', { class: 'hu-line', x1: h1[0], y1: h1[1], x2: h2[0], y2: h2[1] }));
    base.append(svg('text', { class: 'hu-label', x: h1[0] - 118, y: h1[1] + 16 }, '胡焕庸线 Hu line'));
    base.append(svg('text', { class: 'side-label', x: 130, y: 560 }, '西 WEST'));
    base.append(svg('text', { class: 'side-label', x: 560, y: 590 }, '东 EAST'));
    this.base.append(base);

    const cityLayer = svg('g', { class: 'cities' });
    for (const city of cities) {
      this.places.set(city.id, [city.lon, city.lat]);
      const [x, y] = project([city.lon, city.lat]);
      const g = svg('g', { class: 'city', id: `city-${city.id}` });
      g.append(svg('circle', { cx: x, cy: y, r: 2 }), svg('title', {}, `${city.name_zh} ${city.name_en}`));
      if (NAMED_CITIES.has(city.id)) g.append(svg('text', { x: x + 4, y: y + 3 }, city.name_zh));
      cityLayer.append(g);
    }
    this.base.append(cityLayer);

    const cardLayer = svg('g', { class: 'hubs' });
    const clusterLayer = svg('g', { class: 'clusters' });
    for (const c of clusters) {
      const [x, y] = project([c.lon, c.lat]);
      const node = svg('g', { class: 'cluster', id: `cluster-${c.id}`, 'data-hub': c.hub });
      node.append(svg('circle', { cx: x, cy: y, r: 4.5 }), svg('title', {}, `${c.name_zh}\n${c.name_en}`));
      node.addEventListener('click', () => this.onCluster(c));
      clusterLayer.append(node);
      this.clusters.set(c.id, { lon: c.lon, lat: c.lat, hub: c.hub, node });
      this.places.set(c.id, [c.lon, c.lat]);
    }
    for (const hub of hubs) {
      const first = this.clusters.get(hub.clusters[0]);
      if (first) {
        this.hubFirstCluster.set(hub.id, hub.clusters[0]);
        this.places.set(hub.id, [first.lon, first.lat]);
      }
      cardLayer.append(this.#hubCard(hub, hubs.indexOf(hub)));
    }
    root.append(cardLayer, clusterLayer);
  }

  #hubCard(hub, index) {
    const [x, y] = CARD_AT[hub.id] ?? [8 + (index % 4) * (CARD_W + 8), 8 + Math.floor(index / 4) * (CARD_H + 8)];
    const g = svg('g', { class: 'hub', id: `hub-${hub.id}`, 'data-hub': hub.id, tabindex: 0, role: 'button' });
    for (const id of hub.clusters) {
      const c = this.clusters.get(id);
      if (!c) continue;
      const [cx, cy] = project([c.lon, c.lat]);
      const ax = Math.min(Math.max(cx, x), x + CARD_W);
      const ay = Math.min(Math.max(cy, y), y + CARD_H);
      g.append(svg('line', { class: 'leader', x1: cx, y1: cy, x2: ax, y2: ay }));
    }
    g.append(svg('rect', { class: 'box', x, y, width: CARD_W, height: CARD_H, rx: 6 }));
    g.append(svg('text', { class: 'zh', x: x + 8, y: y + 16 }, hub.name_zh));
    g.append(svg('text', { class: 'side', x: x + CARD_W - 8, y: y + 15, 'text-anchor': 'end' },
      hub.side === 'east' ? '东 east' : '西 west'));
    const en = svg('text', { class: 'en', x: x + 8, y: y + 27 }, hub.name_en);
    if (hub.name_en.length > 34) {
      en.setAttribute('textLength', CARD_W - 16);
      en.setAttribute('lengthAdjust', 'spacingAndGlyphs');
    }
    g.append(en);
    const bars = {};
    ARCHS.forEach((arch, i) => {
      const by = y + 37 + i * 11;
      const track = { x: x + 32, width: CARD_W - 72 };
      const alloc = svg('rect', { x: track.x, y: by, width: 0, height: 6, rx: 1, fill: ARCH_COLOURS[arch] });
      const ext = svg('rect', { class: 'ext', x: track.x, y: by, width: 0, height: 6 });
      const pct = svg('text', { class: 'pct', x: x + CARD_W - 8, y: by + 6 }, '–');
      g.append(svg('text', { class: 'arch', x: x + 8, y: by + 6 }, arch),
        svg('rect', { class: 'track', x: track.x, y: by, width: track.width, height: 6, rx: 1 }), alloc, ext, pct);
      bars[arch] = { track, alloc, ext, pct };
    });
    g.append(svg('title', {}, `${hub.name_zh} ${hub.name_en}: click for its sites`));
    g.addEventListener('click', () => this.onHub(hub.id));
    g.addEventListener('keydown', (e) => { if (e.key === 'Enter') this.onHub(hub.id); });
    this.hubCards.set(hub.id, { g, bars });
    return g;
  }

  /** Refresh every card from GET /v1/hubs. */
  updateHubs(hubs) {
    for (const hub of hubs) {
      const card = this.hubCards.get(hub.id);
      if (!card) continue;
      for (const arch of ARCHS) {
        const bar = card.bars[arch];
        const cap = hub.capacity[arch];
        if (!cap || !cap.total) {
          bar.alloc.setAttribute('width', 0);
          bar.ext.setAttribute('width', 0);
          bar.pct.textContent = '–';
          continue;
        }
        const a = (cap.allocated / cap.total) * bar.track.width;
        const e = (cap.in_use_external / cap.total) * bar.track.width;
        bar.alloc.setAttribute('width', a.toFixed(1));
        bar.ext.setAttribute('x', (bar.track.x + a).toFixed(1));
        bar.ext.setAttribute('width', e.toFixed(1));
        bar.pct.textContent = `${Math.round(((cap.allocated + cap.in_use_external) / cap.total) * 100)}%`;
      }
      card.g.dataset.sites = `${hub.sites.online}/${hub.sites.total}`;
    }
  }

  clusterOf(site, hub) {
    if (site?.cluster && this.clusters.has(site.cluster)) return site.cluster;
    return this.hubFirstCluster.get(hub);
  }

  /** Draw one allocation: an arc from the origin to the cluster, coloured by architecture. */
  arc(origin, clusterId, arch) {
    const from = this.places.get(origin);
    const cluster = this.clusters.get(clusterId);
    if (!from || !cluster) return;
    const [x1, y1] = project(from);
    const [x2, y2] = project([cluster.lon, cluster.lat]);
    this.flows.add(x1, y1, x2, y2, ARCH_COLOURS[arch] ?? '#9fb3d1');
  }

  legend(container) {
    container.replaceChildren(...ARCHS.map((a) => {
      const item = el('span');
      item.append(el('i', { style: `background:${ARCH_COLOURS[a]}` }), a);
      return item;
    }), Object.assign(el('span'), { innerHTML: '<i style="background:var(--ext)"></i>external use' }));
  }
}
