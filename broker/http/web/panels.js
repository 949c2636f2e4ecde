// The detail pages, opened by hash routes: #/site/ID, #/hub/ID and #/job/ID.
// Each renders into the side panel and is refreshed while it stays open.

import { ARCH_COLOURS } from './map.js';
import { esc, fmt, getJSON } from './dom.js';

const REFRESH_MS = 2000;

function stack(pool) {
  const total = pool.total || 1;
  const a = (pool.allocated / total) * 100;
  const x = (pool.in_use_external / total) * 100;
  return `<div class="stack" title="${pool.allocated} allocated, ${pool.in_use_external} external, ${pool.free} free">`
    + `<span class="alloc" style="width:${a.toFixed(1)}%;background:${ARCH_COLOURS[pool.arch] ?? ''}"></span>`
    + `<span class="ext" style="width:${x.toFixed(1)}%"></span></div>`;
}

const kv = (pairs) => `<dl class="kv">${pairs.map(([k, v]) => `<dt>${esc(k)}</dt><dd>${v}</dd>`).join('')}</dl>`;
const badge = (state) => `<span class="badge ${esc(state)}">${esc(state)}</span>`;
const siteLink = (id) => `<a href="#/site/${esc(id)}">${esc(id)}</a>`;
// A site's reliability score (0-100, what it delivered of its recent work), coloured by how it ranks.
const reliability = (r) => (r ? `<span class="reliability ${r.score >= 90 ? 'good' : r.score >= 60 ? 'fair' : 'poor'}"`
  + ` title="accepted ${r.accepted} · completed ${r.completed} · timed out ${r.timed_out} · rejected ${r.rejected}`
  + ` · failed ${r.failed} · lost ${r.lost} (${r.lost_device_hours} device-h) · half-life ${r.half_life_hours} h">`
  + `${Number(r.score).toFixed(1)}</span>` : '–');

async function sitePage(id, ctx) {
  const site = await getJSON(`/v1/sites/${encodeURIComponent(id)}`);
  const hub = ctx.hubs.get(site.hub);
  const energy = site.energy ?? {};
  const latency = Object.entries(site.measured_latency_ms ?? {}).sort((a, b) => a[1] - b[1]).slice(0, 8);
  const pools = site.pools.map((p) => `<tr><td><span class="arch-tag arch-${esc(p.arch)}">${esc(p.arch)}</span></td>`
    + `<td>${esc(p.model)}</td><td>${stack(p)}</td><td>${p.free}</td><td>${p.allocated}</td><td>${p.in_use_external}</td>`
    + `<td>${p.total}</td><td>${fmt.price(p.price_cny_per_hour)}</td></tr>`).join('');
  const recent = ctx.feed.atSite(site.id).map((e) => `<tr><td>${fmt.time(e.ts)}</td><td>${badge(e.type)}</td>`
    + `<td><a href="#/job/${esc(e.job)}">${esc(e.job)}</a></td><td>${esc(e.model ?? '')} ×${esc(e.count ?? '')}</td></tr>`).join('');
  return `<h1 data-site="${esc(site.id)}">${esc(site.id)} ${badge(site.status)}</h1>`
    + `<div class="sub">${esc(hub ? `${hub.name_zh} ${hub.name_en}` : site.hub)}${site.cluster ? ` · ${esc(site.cluster)}` : ''}</div>`
    + kv([
      ['last seen', `${fmt.ago(site.last_seen)} <span class="muted">${esc(site.last_seen ?? '')}</span>`],
      ['reliability', reliability(site.reliability)],
      ['PUE', esc(energy.pue ?? '–')],
      ['green share', fmt.pct(energy.green_share)],
      ['tariff', energy.tariff_cny_per_kwh != null ? `${energy.tariff_cny_per_kwh} CNY/kWh` : '–'],
    ])
    + `<h3>Pools</h3><table><thead><tr><th>arch</th><th>model</th><th>allocated / external</th><th>free</th><th>alloc</th>`
    + `<th>ext</th><th>total</th><th>¥/h</th></tr></thead><tbody>${pools || '<tr><td colspan="8" class="muted">no pools</td></tr>'}</tbody></table>`
    + (latency.length ? `<h3>Measured latency</h3>${kv(latency.map(([k, v]) => [k, `${Number(v).toFixed(1)} ms`]))}` : '')
    + `<h3>Status history</h3><table><tbody>${(site.status_history ?? []).slice(-12).reverse()
      .map((e) => `<tr><td>${esc(e.ts ?? '')}</td><td>${badge(e.status)}</td></tr>`).join('')
      || '<tr><td class="muted">no changes recorded</td></tr>'}</tbody></table>`
    + `<h3>Recent activity here</h3><table><tbody>${recent || '<tr><td class="muted">nothing since this page opened</td></tr>'}</tbody></table>`;
}

async function hubPage(id, ctx) {
  const [{ sites }, { hubs }] = await Promise.all([getJSON(`/v1/sites?hub=${encodeURIComponent(id)}`), getJSON('/v1/hubs')]);
  const hub = hubs.find((h) => h.id === id);
  if (!hub) throw new Error(`no hub ${id}`);
  const caps = Object.entries(hub.capacity).map(([arch, c]) => `<tr><td><span class="arch-tag arch-${esc(arch)}">${esc(arch)}</span></td>`
    + `<td>${stack({ ...c, arch })}</td><td>${fmt.int(c.free)}</td><td>${fmt.int(c.allocated)}</td><td>${fmt.int(c.in_use_external)}</td>`
    + `<td>${fmt.int(c.total)}</td></tr>`).join('');
  const rows = sites.map((s) => {
    const total = s.pools.reduce((n, p) => n + p.total, 0);
    const used = s.pools.reduce((n, p) => n + p.allocated + p.in_use_external, 0);
    const models = [...new Set(s.pools.map((p) => p.model))].join(', ');
    return `<tr><td>${siteLink(s.id)}</td><td>${badge(s.status)}</td><td>${esc(s.cluster ?? '')}</td><td>${fmt.pct(total ? used / total : 0)}</td>`
      + `<td>${fmt.int(total)}</td><td>${reliability(s.reliability)}</td><td class="muted">${esc(models)}</td></tr>`;
  }).join('');
  ctx.hubs.set(hub.id, hub);
  return `<h1 data-hub="${esc(hub.id)}">${esc(hub.name_zh)}</h1><div class="sub">${esc(hub.name_en)} · ${hub.side === 'east' ? '东 east' : '西 west'}</div>`
    + kv([
      ['clusters', hub.clusters.map((c) => `${esc(c.name_zh)} <span class="muted">${esc(c.id)}</span>`).join('<br>')],
      ['sites online', `${hub.sites.online} / ${hub.sites.total}`],
      ['tariff · PUE · green', `${hub.tariff_cny_per_kwh} CNY/kWh · ${hub.pue} · ${fmt.pct(hub.green_share)}`],
    ])
    + `<h3>Capacity</h3><table><thead><tr><th>arch</th><th>allocated / external</th><th>free</th><th>alloc</th><th>ext</th><th>total</th></tr></thead>`
    + `<tbody>${caps || '<tr><td colspan="6" class="muted">no capacity reported</td></tr>'}</tbody></table>`
    + `<h3>Sites</h3><table><thead><tr><th>site</th><th>status</th><th>cluster</th><th>in use</th><th>devices</th><th>reliability</th><th>models</th></tr></thead>`
    + `<tbody>${rows || '<tr><td colspan="7" class="muted">no sites</td></tr>'}</tbody></table>`;
}

function scoreCells(c) {
  return `<td>${c.score != null ? Number(c.score).toFixed(1) : '–'}</td>`
    + `<td>${Object.entries(c.scores ?? {}).map(([k, v]) => `<span title="${esc(k)}">${esc(k)} ${Number(v).toFixed(0)}</span>`).join(' · ')}</td>`;
}

async function jobPage(id) {
  const [job, history] = await Promise.all([
    getJSON(`/v1/jobs/${encodeURIComponent(id)}`),
    getJSON(`/v1/dashboard/jobs/${encodeURIComponent(id)}/events`).catch(() => ({ events: [] })),
  ]);
  const r = job.resources ?? {};
  const a = job.allocation;
  let allocation = '<p class="muted">not allocated</p>';
  if (a) {
    const chosen = { site: a.site, hub: a.hub, model: a.model, devices: a.devices, price_cny_per_hour: a.price_cny_per_hour,
      latency_ms: a.latency_ms, score: a.score, scores: a.scores };
    const candidates = [chosen, ...(a.runners_up ?? [])];
    const named = Object.entries(a.scores ?? {}).map(([k, v]) => `<div><span class="scorebar" style="width:${Math.max(2, Number(v))}px"></span>`
      + `${esc(k)} <b>${Number(v).toFixed(1)}</b></div>`).join('');
    allocation = kv([
      ['site', `${siteLink(a.site)} <span class="muted">${esc(a.hub ?? '')}</span>`],
      ['devices', `<span class="arch-tag arch-${esc(a.arch ?? '')}">${esc(a.model)}</span> × ${a.devices}`],
      ['price', `${fmt.price(a.price_cny_per_hour)} CNY/device-h · ${fmt.price(a.cost_cny_per_hour)} CNY/h`],
      ['latency', `${Number(a.latency_ms).toFixed(1)} ms`],
      ['score', a.score != null ? `<b>${Number(a.score).toFixed(1)}</b>` : '–'],
      ...(a.transfer_hours != null ? [['data moved', `<span class="data-move">${Number(a.transfer_hours).toFixed(1)} h of transfer`
        + ` · ¥${fmt.int(Math.round(a.transfer_cost_cny))} egress · finishes in ${Number(a.finish_hours).toFixed(1)} h`
        + ` · ¥${fmt.int(Math.round(a.total_cost_cny))} in all</span>`]] : []),
      ['assigned · started', `${esc(a.assigned_at ?? '–')} · ${esc(a.started_at ?? '–')}`],
    ]) + (named ? `<h3>Scores that decided</h3><div class="scores">${named}</div>` : '')
      + `<h3>Runner-up sites</h3><table class="candidates"><thead><tr><th>site</th><th>hub</th><th>model</th><th>¥/h</th><th>ms</th>`
      + `<th>score</th><th>named scores</th></tr></thead><tbody>${candidates.map((c, i) => `<tr class="${i === 0 ? 'chosen' : ''}">`
        + `<td>${siteLink(c.site)}${i === 0 ? ' ✓' : ''}</td><td>${esc(c.hub ?? '')}</td><td>${esc(c.model ?? '')}</td>`
        + `<td>${fmt.price(c.price_cny_per_hour)}</td><td>${c.latency_ms != null ? Number(c.latency_ms).toFixed(0) : '–'}</td>`
        + `${scoreCells(c)}</tr>`).join('')}</tbody></table>`;
  }
  const timeline = history.events.map((e) => `<li><time>${fmt.time(e.ts)}</time>${badge(e.type)} `
    + `${e.site ? `at ${siteLink(e.site)}` : ''} ${e.reason ? `<span class="muted">${esc(e.reason)}</span>` : ''}</li>`).join('');
  return `<h1 data-job="${esc(job.id)}">${esc(job.name)} ${badge(job.state)}</h1>`
    + `<div class="sub">${esc(job.id)}</div>`
    + kv([
      ['tenant · priority', `${esc(job.tenant)} · ${esc(job.priority)}`],
      ['workload', esc(job.workload)],
      ['asks for', `${esc(r.arch ?? (r.archs ?? []).join('/'))} × ${esc(r.count ?? '')} ${esc((r.models ?? []).join(', '))}`],
      ['from', esc(job.origin)],
      ...((job.datasets ?? []).length ? [['data', job.datasets.map((d) => `${esc(d.name)}: ${fmt.int(d.size_gb)} GB at `
        + `${esc(d.location)}${d.copyable === false ? ' <span class="muted">(stays there)</span>' : ''}`).join('<br>')]] : []),
      ['limits', `${job.max_latency_ms != null ? `≤ ${job.max_latency_ms} ms` : 'any latency'} · `
        + `${job.max_price_cny_per_hour != null ? `≤ ${job.max_price_cny_per_hour} CNY/h` : 'any price'}`],
      ['duration', `${job.duration_hours} h`],
      ['submitted', esc(job.created ?? '–')],
      ...(job.waiting ? [['waiting', `<span class="muted">${esc(job.waiting)}</span>`]] : []),
      ...(job.reason ? [['reason', esc(job.reason)]] : []),
    ])
    + `<h3>Allocation</h3><div class="allocation" data-site="${esc(a?.site ?? '')}">${allocation}</div>`
    + `<h3>State history</h3><ol class="timeline">${timeline || '<li class="muted">no events yet</li>'}</ol>`;
}

const PAGES = { site: sitePage, hub: hubPage, job: jobPage };

export class Panels {
  constructor(ctx) {
    this.ctx = ctx;
    this.overlay = document.getElementById('overlay');
    this.body = document.getElementById('panel-body');
    this.timer = null;
    this.route = '';
    document.getElementById('panel-close').addEventListener('click', () => this.close());
    this.overlay.addEventListener('click', (e) => { if (e.target === this.overlay) this.close(); });
    document.addEventListener('keydown', (e) => { if (e.key === 'Escape') this.close(); });
    window.addEventListener('hashchange', () => this.follow());
  }

  close() {
    if (location.hash && location.hash !== '#/') location.hash = '#/';
  }

  follow() {
    clearTimeout(this.timer);
    const match = /^#\/(site|hub|job)\/(.+)$/.exec(location.hash);
    if (!match) {
      this.overlay.hidden = true;
      this.route = '';
      return;
    }
    const [route, kind, id] = [match[0], match[1], decodeURIComponent(match[2])];
    if (route !== this.route) {
      this.route = route;
      this.body.innerHTML = '<p class="muted">loading…</p>';
      this.body.dataset.kind = kind;
      this.overlay.hidden = false;
    }
    this.render(route, kind, id);
  }

  async render(route, kind, id) {
    let html;
    try {
      html = await PAGES[kind](id, this.ctx);
    } catch (err) {
      html = `<h1>${esc(id)}</h1><p class="error">${esc(err.message)}</p>`;
    }
    if (route !== this.route) return; // the operator moved on meanwhile
    this.body.innerHTML = html;
    clearTimeout(this.timer);
    this.timer = setTimeout(() => { if (route === this.route) this.render(route, kind, id); }, REFRESH_MS);
  }
}
