// The operators' dashboard: wires the map, the live feed, the queue, the charts and the detail
// panels to the broker's API. Events from the stream are queued and applied once per animation
// frame, so a burst of allocations costs one DOM update, not one per event.

import { LineChart } from './charts.js';
import { AuthError, esc, fmt, getJSON, token } from './dom.js';
import { Feed } from './feed.js';
import { ARCH_COLOURS, ARCHS, ChinaMap } from './map.js';
import { Panels } from './panels.js';

const HUBS_EVERY_MS = 3000;
const SUMMARY_EVERY_MS = 2000;
const SITES_EVERY_MS = 30000;
const MAX_PENDING = 5000; // events held while the tab is hidden (frames do not run then)
const ARC_MAX_AGE_MS = 5000; // replayed history is listed, not animated
const JOB_MEMORY = 20000;
const FEED_EVERY_MS = 100;

const $ = (id) => document.getElementById(id);

const state = {
  hubs: new Map(), // hub id -> latest /v1/hubs entry (names, clusters, capacity)
  siteCluster: new Map(), // site id -> cluster id
  jobArch: new Map(), // job id -> arch (only allocation events carry it)
  pending: [],
  feedPending: [],
  feedFlushedAt: 0,
  frameQueued: false,
  placements: [], // arrival times of allocations, for the rate
  lastRateAt: Date.now(),
  placedSinceTick: 0,
};

const feed = new Feed($('feed'), $('feed-count'));
const map = new ChinaMap($('map-base'), $('flows'), $('map'), {
  onHub: (id) => { location.hash = `#/hub/${id}`; },
  onCluster: (c) => { location.hash = `#/hub/${c.hub}`; },
});
const panels = new Panels({ hubs: state.hubs, feed });
const charts = {
  util: new LineChart($('chart-util'), ARCHS.map((a) => ({ key: a, colour: ARCH_COLOURS[a] })), { fixedMax: 100, unit: '%' }),
  rate: new LineChart($('chart-rate'), [{ key: 'rate', colour: '#5aa9ff', area: true }]),
  queue: new LineChart($('chart-queue'), [
    { key: 'total', colour: '#ffcc66', area: true }, { key: 'high', colour: '#ff6b6b' },
  ]),
};

// --------------------------------------------------------------------------------- live stream

function onEvent(message) {
  state.pending.push(JSON.parse(message.data));
  if (state.pending.length > MAX_PENDING) state.pending.splice(0, state.pending.length - MAX_PENDING);
  if (!state.frameQueued) {
    state.frameQueued = true;
    requestAnimationFrame(applyPending);
  }
}

function applyPending() {
  state.frameQueued = false;
  const batch = state.pending;
  state.pending = [];
  const now = Date.now();
  for (const e of batch) {
    if (e.type !== 'allocated') continue;
    if (e.arch) {
      state.jobArch.set(e.job, e.arch);
      if (state.jobArch.size > JOB_MEMORY) state.jobArch.delete(state.jobArch.keys().next().value);
    }
    if (now - (e.ts ?? now) > ARC_MAX_AGE_MS) continue;
    state.placements.push(now);
    state.placedSinceTick += 1;
    const cluster = map.clusterOf({ cluster: state.siteCluster.get(e.site) ?? guessCluster(e.site) }, e.hub);
    map.arc(e.origin, cluster, e.arch);
  }
  // Arcs move every frame; the table is rebuilt at most every FEED_EVERY_MS, which a reader cannot
  // tell apart from every frame but which keeps layout work flat under a flood of events.
  for (const e of batch) state.feedPending.push(e);
  if (state.feedPending.length > MAX_PENDING) state.feedPending.splice(0, state.feedPending.length - MAX_PENDING);
  if (performance.now() - state.feedFlushedAt >= FEED_EVERY_MS) {
    feed.push(state.feedPending, state.jobArch);
    state.feedPending = [];
    state.feedFlushedAt = performance.now();
  } else if (state.feedPending.length && !state.frameQueued) {
    state.frameQueued = true;
    requestAnimationFrame(applyPending);
  }
}

function guessCluster(site) {
  // Site ids usually start with their cluster's id ("guian-01"); the site list says for sure.
  for (const id of map.clusters.keys()) if (site?.startsWith(`${id}-`)) return id;
  return undefined;
}

function openStream(from) {
  // EventSource cannot send headers: the stream takes the token from the query instead.
  const params = new URLSearchParams();
  if (from) params.set('last_event_id', from);
  if (token.get()) params.set('access_token', token.get());
  const query = params.toString();
  const source = new EventSource(query ? `/v1/allocations/stream?${query}` : '/v1/allocations/stream');
  const indicator = $('stream-state');
  const show = (s, label) => { indicator.dataset.state = s; indicator.querySelector('.label').textContent = label; };
  source.addEventListener('open', () => show('live', 'live'));
  source.addEventListener('error', () => show(source.readyState === EventSource.CLOSED ? 'down' : 'connecting', 'reconnecting'));
  source.addEventListener('allocation', onEvent);
  return source;
}

// --------------------------------------------------------------------------------- polling

function every(ms, fn) {
  const run = async () => {
    try {
      await fn();
    } catch (err) {
      console.warn(err.message); // the next round retries; a warning, not an error, for a transient outage
    }
    setTimeout(run, ms);
  };
  return run();
}

async function pollHubs() {
  const { hubs } = await getJSON('/v1/hubs');
  map.updateHubs(hubs);
  let online = 0;
  let sites = 0;
  const totals = Object.fromEntries(ARCHS.map((a) => [a, { total: 0, used: 0 }]));
  for (const hub of hubs) {
    state.hubs.set(hub.id, hub);
    online += hub.sites.online;
    sites += hub.sites.total;
    for (const [arch, c] of Object.entries(hub.capacity)) {
      totals[arch] ??= { total: 0, used: 0 };
      totals[arch].total += c.total;
      totals[arch].used += c.allocated + c.in_use_external;
    }
  }
  const all = Object.values(totals).reduce((s, t) => ({ total: s.total + t.total, used: s.used + t.used }), { total: 0, used: 0 });
  $('stat-sites').textContent = `${fmt.int(online)} / ${fmt.int(sites)}`;
  $('stat-devices').textContent = fmt.int(all.total);
  $('stat-util').textContent = all.total ? fmt.pct(all.used / all.total) : '–';
  charts.util.push(Object.fromEntries(ARCHS.filter((a) => totals[a].total).map((a) => [a, (totals[a].used / totals[a].total) * 100])));
}

async function pollSites() {
  const { sites } = await getJSON('/v1/sites');
  for (const s of sites) if (s.cluster) state.siteCluster.set(s.id, s.cluster);
}

function renderHolds(holds) {
  $('holds-note').textContent = holds.standing.length ? `${holds.standing.length}${holds.more ? '+' : ''} standing` : '';
  $('holds').innerHTML = holds.standing.length
    ? holds.standing.map((h) => `<tr data-hold="${esc(h.id)}"><td>${esc(h.site)}</td>`
      + `<td>${fmt.int(h.devices)}× ${esc(h.model)}</td><td>${fmt.price(h.price_cny_per_hour)}</td>`
      + `<td class="muted">${esc(h.for_job ? `preemption for ${h.for_job}` : h.tenant)} · ${Math.round(h.expires_in_s)} s</td></tr>`).join('')
    : '<tr><td class="muted">no standing holds</td></tr>';
  $('preemptions').innerHTML = holds.preemptions.map((p) => `<li data-job="${esc(p.job)}">`
    + `<a href="#/job/${esc(p.job)}">${esc(p.job)}</a> gave way at ${esc(p.site ?? '')} to `
    + `<a href="#/job/${esc(p.by)}">${esc(p.by)}</a> (${esc(p.by_tenant ?? '')})</li>`).join('');
}

function renderSummary(summary) {
  const q = summary.queue;
  $('stat-queue').textContent = fmt.int(q.total);
  $('queue-depth').innerHTML = [['total', q.total], ...Object.entries(q.by_priority)]
    .map(([k, v]) => `<div data-priority="${esc(k)}"><b>${fmt.int(v)}</b><span>${esc(k)}</span></div>`).join('')
    + `<div><b>${fmt.int(summary.awaiting_acceptance)}</b><span>awaiting site</span></div>`;
  const w = summary.waiting;
  $('queue-note').textContent = w.oldest_waiting_s != null ? `oldest waits ${fmt.seconds(w.oldest_waiting_s)}` : '';
  const top = w.reasons[0]?.jobs ?? 1;
  $('reasons').innerHTML = w.reasons.length
    ? w.reasons.slice(0, 5).map((r) => `<li title="${esc(r.reason)}"><b>${fmt.int(r.jobs)}</b> ${esc(r.reason)}`
      + `<span class="bar" style="width:${((r.jobs / top) * 100).toFixed(0)}%"></span></li>`).join('')
    : '<li class="none">nothing is waiting</li>';
  renderHolds(summary.holds ?? { standing: [], preemptions: [] });
  const revenue = summary.revenue_24h_by_hub ?? [];
  $('revenue').innerHTML = revenue.length
    ? revenue.map((r) => `<tr data-hub="${esc(r.hub)}"><td>${esc(r.hub)}</td><td>¥${fmt.int(Math.round(r.cost_cny))}</td>`
      + `<td class="muted">${fmt.int(Math.round(r.device_hours))} device-h · ${fmt.int(r.jobs)} jobs</td></tr>`).join('')
    : '<tr><td class="muted">no finished jobs yet</td></tr>';
  const now = Date.now();
  const seconds = Math.max(0.5, (now - state.lastRateAt) / 1000);
  charts.rate.push({ rate: state.placedSinceTick / seconds }, now);
  state.placedSinceTick = 0;
  state.lastRateAt = now;
  while (state.placements.length && state.placements[0] < now - 60000) state.placements.shift();
  $('stat-rate').textContent = fmt.int(state.placements.length);
  charts.queue.push({ total: q.total, high: q.by_priority.high ?? 0 }, now);
}

// --------------------------------------------------------------------------------- start

function wireFilters(hubs) {
  const hubSelect = $('filter-hub');
  for (const hub of hubs) hubSelect.append(new Option(`${hub.name_zh} ${hub.id}`, hub.id));
  for (const name of ['hub', 'arch', 'tenant', 'type']) {
    $(`filter-${name}`).addEventListener('change', (e) => feed.setFilter(name, e.target.value));
  }
  feed.onNewTenant = (tenants) => {
    const select = $('filter-tenant');
    const chosen = select.value;
    select.replaceChildren(new Option('all tenants', ''), ...tenants.map((t) => new Option(t, t)));
    select.value = chosen;
  };
  $('feed').addEventListener('click', (e) => {
    const row = e.target.closest('tr[data-job]');
    if (row && !e.target.closest('a')) location.hash = `#/job/${row.dataset.job}`;
  });
}

// --------------------------------------------------------------------------------- token

function tokenFromAddress() {
  // `suanwang demo` prints the page's address with ?token=...: keep it, then drop it from the address bar.
  const url = new URL(location.href);
  const given = url.searchParams.get('token');
  if (!given) return;
  token.set(given);
  url.searchParams.delete('token');
  history.replaceState(null, '', url);
}

function askForToken(reason) {
  $('token-reason').textContent = reason;
  $('token-overlay').hidden = false;
  $('token-input').focus();
  return new Promise((resolve) => {
    $('token-form').addEventListener('submit', (e) => {
      e.preventDefault();
      token.set($('token-input').value.trim());
      $('token-overlay').hidden = true;
      resolve();
    }, { once: true });
  });
}

async function placesWithToken() {
  for (;;) {
    try {
      return await getJSON('/v1/dashboard/places');
    } catch (err) {
      if (!(err instanceof AuthError)) throw err;
      document.body.dataset.ready = 'token';
      await askForToken(token.get() ? `That token was refused: ${err.message}` : 'This page needs an operator token.');
    }
  }
}

async function main() {
  tokenFromAddress();
  $('token-button').addEventListener('click', () => askForToken('Replace the API token.').then(() => location.reload()));
  const places = await placesWithToken();
  map.setPlaces(places);
  map.legend($('legend'));
  wireFilters(places.hubs);
  const summary = await getJSON('/v1/dashboard/summary');
  renderSummary(summary);
  openStream(summary.backfill_from);
  every(HUBS_EVERY_MS, pollHubs);
  every(SITES_EVERY_MS, pollSites);
  setTimeout(() => every(SUMMARY_EVERY_MS, async () => renderSummary(await getJSON('/v1/dashboard/summary'))), SUMMARY_EVERY_MS);
  panels.follow();
  document.body.dataset.ready = 'true';
}

main().catch((err) => {
  document.body.dataset.ready = 'failed';
  console.error('dashboard failed to start:', err);
});
