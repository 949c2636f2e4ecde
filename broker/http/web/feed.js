// The live allocation feed: events arrive in batches (one per animation frame); only the newest
// MAX_ROWS rows that pass the filters are in the DOM, and a longer ring of events lets a filter
// change rebuild the table without asking the server.

import { esc, fmt } from './dom.js';

const MAX_ROWS = 200;
const MEMORY = 3000;
const CALM_ROWS = 8;
const GROUPS = {
  done: new Set(['completed', 'released', 'cancelled']),
  trouble: new Set(['requeued', 'failed', 'rejected']),
};

export class Feed {
  constructor(tbody, countNode) {
    this.tbody = tbody;
    this.countNode = countNode;
    this.events = [];
    this.filters = { hub: '', arch: '', tenant: '', type: '' };
    this.tenants = new Set();
    this.onNewTenant = () => {};
    this.total = 0;
  }

  matches(e) {
    const f = this.filters;
    if (f.hub && e.hub !== f.hub) return false;
    if (f.arch && e.arch !== f.arch) return false;
    if (f.tenant && e.tenant !== f.tenant) return false;
    if (f.type) {
      const group = GROUPS[f.type];
      if (group ? !group.has(e.type) : e.type !== f.type) return false;
    }
    return true;
  }

  /** Add a batch of events (oldest first): one DOM insertion and one trim for the whole batch. */
  push(batch, arch) {
    let fresh = false;
    for (const e of batch) {
      if (!e.arch && e.job && arch.has(e.job)) e.arch = arch.get(e.job); // later events omit the arch
      if (e.tenant && !this.tenants.has(e.tenant)) {
        this.tenants.add(e.tenant);
        fresh = true;
      }
    }
    this.events.push(...batch);
    if (this.events.length > MEMORY) this.events.splice(0, this.events.length - MEMORY);
    this.total += batch.length;
    if (fresh) this.onNewTenant([...this.tenants].sort());
    const shown = batch.filter((e) => this.matches(e)).slice(-MAX_ROWS);
    if (shown.length) {
      const calm = shown.length <= CALM_ROWS; // highlight new rows only while they can be read one by one
      this.tbody.insertAdjacentHTML('afterbegin', shown.reverse().map((e) => this.row(e, calm)).join(''));
      const rows = this.tbody.rows;
      for (let i = rows.length - 1; i >= MAX_ROWS; i--) rows[i].remove();
    }
    this.countNode.textContent = `${fmt.int(this.total)} events`;
  }

  setFilter(name, value) {
    this.filters[name] = value;
    const shown = [];
    for (let i = this.events.length - 1; i >= 0 && shown.length < MAX_ROWS; i--) {
      if (this.matches(this.events[i])) shown.push(this.events[i]);
    }
    this.tbody.innerHTML = shown.map((e) => this.row(e, false)).join('');
  }

  row(e, fresh) {
    const where = e.site ? `${esc(e.origin ?? '')}${e.origin ? ' → ' : ''}<b>${esc(e.site)}</b>` : esc(e.origin ?? '');
    const devices = e.model ? `${esc(e.count)}× <span class="arch-tag arch-${esc(e.arch ?? '')}">${esc(e.model)}</span>` : '';
    const title = [e.hub, e.reason].filter(Boolean).join(': ');
    const why = title ? ` title="${esc(title)}"` : '';
    const subject = e.job ? `<a href="#/job/${esc(e.job)}">${esc(e.job)}</a>` : esc(e.hold ?? ''); // holds have no job
    return `<tr class="${fresh ? 'new' : ''}" data-job="${esc(e.job ?? '')}" data-type="${esc(e.type)}"${why}>`
      + `<td>${fmt.time(e.ts)}</td><td><span class="badge ${esc(e.type)}">${esc(e.type)}</span></td>`
      + `<td>${subject}</td><td>${esc(e.tenant ?? '')}</td>`
      + `<td>${where}</td><td>${devices}</td><td>${e.price != null ? fmt.price(e.price) : ''}</td>`
      + `<td>${e.latency_ms != null && e.latency_ms >= 0 ? Number(e.latency_ms).toFixed(0) : ''}</td></tr>`;
  }

  /** Recent events at one site, newest first (for the site page). */
  atSite(site, limit = 20) {
    const found = [];
    for (let i = this.events.length - 1; i >= 0 && found.length < limit; i--) {
      if (this.events[i].site === site) found.push(this.events[i]);
    }
    return found;
  }
}
