'use strict';
// Pinazu Flows dashboard: three pages (runs, one run, agents) on hash routes. The task
// table is virtualised: it holds the rows on screen (fetched in chunks of CHUNK from
// the server, which filters and pages), so a run of 100,000 calls scrolls like one of
// 100. A run's page follows the run over SSE (one event a second).

const ROW = 28;
const CHUNK = 200;
const LABEL_W = 140;

const $ = (sel, root = document) => root.querySelector(sel);

// builds an element; text is always set as text (never parsed as HTML)
function el(tag, attrs = {}, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') e.className = v;
    else if (k === 'text') e.textContent = v;
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? '' : v);
  }
  for (const kid of kids.flat()) {
    if (kid === null || kid === undefined) continue;
    e.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return e;
}

async function api(path, opts) {
  const r = await fetch(path, opts);
  let body;
  try { body = await r.json(); } catch (_) { body = { error: r.statusText }; }
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}

function fmtDuration(ms) {
  if (ms === null || ms === undefined) return '';
  if (ms < 1000) return ms + ' ms';
  if (ms < 60000) return (ms / 1000).toFixed(ms < 10000 ? 2 : 1) + ' s';
  const m = Math.floor(ms / 60000), s = Math.round((ms % 60000) / 1000);
  if (m < 60) return m + ' min ' + s + ' s';
  return Math.floor(m / 60) + ' h ' + (m % 60) + ' min';
}

function fmtAt(ms) {
  if (!ms) return '';
  const d = new Date(ms);
  return d.toLocaleString();
}

const fmtNum = n => (n ?? 0).toLocaleString('en-US');

function preview(value, max = 400) {
  let s = JSON.stringify(value);
  if (s === undefined) s = String(value);
  return s.length > max ? s.slice(0, max) + '… (' + s.length + ' characters)' : s;
}

// ---- routing ------------------------------------------------------------------------

let cleanup = [];
function onLeave(f) { cleanup.push(f); }

function setLive(on) { $('#live-dot').classList.toggle('on', !!on); }

function route() {
  for (const f of cleanup) { try { f(); } catch (_) { /* gone */ } }
  cleanup = [];
  setLive(false);
  const hash = location.hash || '#/';
  const main = $('#main');
  main.replaceChildren();
  $('#nav-runs').classList.toggle('active', hash === '#/' || hash.startsWith('#/runs'));
  $('#nav-agents').classList.toggle('active', hash.startsWith('#/agents'));
  let m;
  if ((m = hash.match(/^#\/run\/([^/?]+)/))) runPage(main, decodeURIComponent(m[1]));
  else if (hash.startsWith('#/agents')) agentsPage(main);
  else runsPage(main);
}
window.addEventListener('hashchange', route);

// ---- runs ---------------------------------------------------------------------------

function runsPage(main) {
  const status = el('select', { id: 'f-status' },
    el('option', { value: '', text: 'any status' }),
    ...['RUNNING', 'SUCCESS', 'FAILED'].map(s => el('option', { value: s, text: s })));
  const flow = el('input', { id: 'f-flow', placeholder: 'flow', size: 16 });
  const since = el('select', { id: 'f-since' },
    el('option', { value: '', text: 'any time' }),
    el('option', { value: '3600000', text: 'last hour' }),
    el('option', { value: '86400000', text: 'last 24 h' }),
    el('option', { value: '604800000', text: 'last 7 days' }));
  const body = el('tbody');
  const info = el('span', { class: 'muted' });
  const older = el('button', { id: 'older', text: 'Older →' });
  const newer = el('button', { id: 'newer', text: '← Newest' });
  main.append(
    el('h1', { text: 'Runs' }),
    el('div', { class: 'filters' }, status, flow, since, info),
    el('table', { id: 'runs-table' },
      el('thead', {}, el('tr', {}, ...['Run', 'Flow', 'Status', 'Calls', 'Executions', 'Cache hits',
        'Retries', 'Wall time', 'When', 'Owner', 'Error'].map(t => el('th', { text: t })))),
      body),
    el('div', { class: 'pager' }, newer, older));
  let cursors = [];   // before_ms of each page after the first
  let last = [];
  async function load() {
    const q = new URLSearchParams({ limit: '50' });
    if (status.value) q.set('status', status.value);
    if (flow.value.trim()) q.set('flow', flow.value.trim());
    if (since.value) q.set('since_ms', String(Date.now() - Number(since.value)));
    if (cursors.length) q.set('before_ms', String(cursors[cursors.length - 1]));
    try {
      const runs = await api('/api/runs?' + q);
      last = runs;
      body.replaceChildren(...runs.map(r => el('tr', {
        class: 'click', 'data-run': r.flow_run_id,
        onclick: () => { location.hash = '#/run/' + r.flow_run_id; },
      },
        el('td', {}, el('a', { href: '#/run/' + r.flow_run_id, text: r.flow_run_id.slice(0, 8) })),
        el('td', { text: r.flow, title: r.parent_run_id ? 'child of run ' + r.parent_run_id : '' },
          r.parent_run_id ? el('span', { class: 'child-mark', text: ' ↳ child' }) : null),
        el('td', { class: 'status ' + r.status, text: r.status }),
        el('td', { text: fmtNum(r.completed) + ' / ' + fmtNum(r.tasks) }),
        el('td', { text: fmtNum(r.executions) }),
        el('td', { text: fmtNum(r.cache_hits) }),
        el('td', { text: fmtNum(r.retries) }),
        el('td', { text: fmtDuration(r.wall_ms) }),
        el('td', { text: fmtAt(r.at_ms) }),
        el('td', { text: r.owner || '' }),
        el('td', { class: 'error-text', text: (r.error || '').slice(0, 120) }))));
      info.textContent = runs.length ? '' : 'no runs match';
      older.disabled = runs.length < 50;
      newer.disabled = cursors.length === 0;
      setLive(cursors.length === 0);
    } catch (e) {
      info.textContent = 'could not list runs: ' + e.message;
      setLive(false);
    }
  }
  for (const f of [status, since]) f.addEventListener('change', () => { cursors = []; load(); });
  flow.addEventListener('input', () => { cursors = []; load(); });
  older.addEventListener('click', () => {
    const at = last.length ? last[last.length - 1].at_ms : null;
    if (at) { cursors.push(at); load(); }
  });
  newer.addEventListener('click', () => { cursors = []; load(); });
  load();
  // the first page follows new runs and counters
  const timer = setInterval(() => { if (!cursors.length) load(); }, 1000);
  onLeave(() => clearInterval(timer));
}

// ---- agents -------------------------------------------------------------------------

function agentsPage(main) {
  const body = el('tbody');
  const info = el('p', { class: 'muted' });
  main.append(el('h1', { text: 'Agents' }), info,
    el('table', { id: 'agents-table' },
      el('thead', {}, el('tr', {}, ...['Agent', 'Slots used', 'Slots free', 'Attempts sent',
        'Attempts/s', 'Labels', 'Tasks', 'Last heartbeat', 'State'].map(t => el('th', { text: t })))),
      body));
  const before = new Map();   // agent -> [time, attempts sent]: attempts/s between polls
  async function load() {
    try {
      const agents = await api('/api/agents');
      const now = performance.now();
      body.replaceChildren(...agents.map(a => {
        const prev = before.get(a.agent_id);
        before.set(a.agent_id, [now, a.attempts || 0]);
        const rate = prev && now > prev[0] ? ((a.attempts || 0) - prev[1]) * 1000 / (now - prev[0]) : null;
        return el('tr', { 'data-agent': a.agent_id },
          el('td', { text: a.agent_id }),
          el('td', { text: fmtNum(a.running) }),
          el('td', { text: fmtNum(Math.max(0, a.slots - a.running)) }),
          el('td', { text: fmtNum(a.attempts || 0) }),
          el('td', { text: rate === null ? '…' : fmtNum(Math.max(0, Math.round(rate))) }),
          el('td', { text: a.labels.map(([k, v]) => k + '=' + v).join(', ') }),
          el('td', { text: a.tasks.length + ' (' + a.tasks.slice(0, 4).join(', ') + (a.tasks.length > 4 ? ', …' : '') + ')' }),
          el('td', { text: a.last_seen_ms + ' ms ago' }),
          el('td', { text: (a.draining ? 'draining' : 'serving') + (a.queued ? ', ' + fmtNum(a.queued) + ' queued' : '') }));
      }));
      info.textContent = agents.length + ' live agent(s)';
      setLive(true);
    } catch (e) {
      info.textContent = 'could not list agents: ' + e.message;
      setLive(false);
    }
  }
  load();
  const timer = setInterval(load, 1000);
  onLeave(() => clearInterval(timer));
}

// ---- one run ------------------------------------------------------------------------

function runPage(main, id) {
  const title = el('h1', {}, 'Run ', el('code', { text: id }));
  const statusEl = el('span', { id: 'run-status', class: 'status' });
  const cancelBtn = el('button', { id: 'cancel-btn', class: 'danger', text: 'Cancel run' });
  const cards = el('div', { class: 'cards', id: 'cards' });
  const facts = el('dl', { class: 'kv', id: 'facts' });
  const errorBox = el('div', { id: 'run-error' });
  const fStatus = el('select', { id: 't-status' }, el('option', { value: '', text: 'any status' }));
  const fTask = el('select', { id: 't-task' }, el('option', { value: '', text: 'any task' }));
  const count = el('span', { class: 'muted', id: 't-count' });
  const head = el('div', { id: 'table-head' }, ...['Call', 'Task', 'Status', 'Att.', 'Agent',
    'Queued', 'Started', 'Ended', 'Duration', 'Source', 'Error'].map(t => el('div', { text: t })));
  const spacer = el('div', { id: 'table-spacer' });
  const wrap = el('div', { id: 'table-wrap' }, head, spacer);
  const canvas = el('canvas', { id: 'timeline' });
  const detail = el('div', { id: 'detail', hidden: true });
  main.append(title, el('div', { class: 'filters' }, statusEl, cancelBtn), cards, facts, errorBox,
    el('h2', { text: 'Tasks' }), el('div', { class: 'filters' }, fStatus, fTask, count), wrap, detail,
    el('h2', { text: 'Timeline (attempts per agent)' }), canvas);

  const table = { matching: 0, version: -1, chunks: new Map(), loading: new Set(), selected: null };
  let run = null;

  function query(extra) {
    const q = new URLSearchParams(extra);
    if (fStatus.value) q.set('status', fStatus.value);
    if (fTask.value) q.set('task', fTask.value);
    return q;
  }

  function visible() {
    const first = Math.max(0, Math.floor((wrap.scrollTop - ROW) / ROW));
    const n = Math.ceil(wrap.clientHeight / ROW) + 2;
    return [first, Math.min(table.matching, first + n)];
  }

  async function loadChunk(c, version) {
    if (table.loading.has(c)) return;
    table.loading.add(c);
    try {
      const page = await api('/api/runs/' + id + '/calls?' + query({ offset: c * CHUNK, limit: CHUNK }));
      table.chunks.set(c, { rows: page.rows, version });
      table.matching = page.matching;
      draw();
    } catch (e) {
      count.textContent = 'could not load the tasks: ' + e.message;
    } finally {
      table.loading.delete(c);
    }
  }

  function rowEl(r, i) {
    const dur = r.started_ms != null && r.ended_ms != null ? fmtDuration(r.ended_ms - r.started_ms) : '';
    const source = r.cache_hit ? 'cache' : r.replayed ? 'replayed' : '';
    const div = el('div', {
      class: 'trow' + (table.selected === r.call ? ' sel' : ''), 'data-call': r.call,
      style: 'top:' + (ROW + i * ROW) + 'px', onclick: () => select(r),
    },
      el('div', { text: '#' + r.call }), el('div', { text: r.task }),
      el('div', { class: 'status ' + r.status, text: r.status }), el('div', { text: r.attempts }),
      el('div', { text: r.agent || '' }), el('div', { text: fmtDuration(r.queued_ms) }),
      el('div', { text: fmtDuration(r.started_ms) }), el('div', { text: fmtDuration(r.ended_ms) }),
      el('div', { text: dur }), el('div', { text: source }),
      el('div', { class: 'error-text', text: r.error || '' }));
    return div;
  }

  // draws the rows on screen; asks for the chunks missing or older than the table
  function draw() {
    spacer.style.height = (ROW + table.matching * ROW) + 'px';
    const [first, end] = visible();
    const rows = [];
    for (let c = Math.floor(first / CHUNK); c * CHUNK < end; c++) {
      const chunk = table.chunks.get(c);
      if (!chunk || chunk.version !== table.version) loadChunk(c, table.version);
      if (!chunk) continue;
      chunk.rows.forEach((r, k) => {
        const i = c * CHUNK + k;
        if (i >= first && i < end) rows.push(rowEl(r, i));
      });
    }
    for (const old of wrap.querySelectorAll('.trow')) old.remove();
    wrap.append(...rows);
    count.textContent = fmtNum(table.matching) + ' call(s)';
  }
  wrap.addEventListener('scroll', () => requestAnimationFrame(draw));

  function resetTable() {
    table.chunks.clear();
    wrap.scrollTop = 0;
    draw();
  }
  fStatus.addEventListener('change', resetTable);
  fTask.addEventListener('change', resetTable);

  function select(r) {
    table.selected = r.call;
    detail.hidden = false;
    const errorBox = el('div', { id: 'detail-error-box' });
    const logsBox = el('div', { id: 'detail-logs-box' }, el('p', { class: 'muted', text: 'loading…' }));
    detail.replaceChildren(
      el('h2', { text: 'Call #' + r.call + ' · ' + r.task }),
      el('dl', { class: 'kv' },
        el('dt', { text: 'Status' }), el('dd', { class: 'status ' + r.status, text: r.status }),
        el('dt', { text: 'Attempts' }), el('dd', { text: r.attempts }),
        el('dt', { text: 'Agent' }), el('dd', { text: r.agent || '—' }),
        el('dt', { text: 'Queued / started / ended' }),
        el('dd', { text: [r.queued_ms, r.started_ms, r.ended_ms].map(fmtDuration).join(' / ') + ' after the run started' }),
        el('dt', { text: 'Answered from' }), el('dd', { text: r.cache_hit ? 'the cache' : r.replayed ? 'the journal (or a result passed in)' : 'its attempt' })),
      errorBox, logsBox);
    draw();
    // the whole error, its chain and the logs come with the one row
    const q = new URLSearchParams({ offset: r.call, limit: 1, with_logs: true });
    api('/api/runs/' + id + '/calls?' + q)
      .then(p => {
        const full = p.rows.find(x => x.call === r.call) || r;
        errorBox.replaceChildren(...[
          full.result ? el('h2', { text: 'Result' }) : null,
          full.result ? el('pre', { id: 'detail-result', text: full.result }) : null,
          full.error ? el('h2', { text: 'Error' }) : null,
          full.error ? el('pre', { class: 'error-text', id: 'detail-error', text: full.error }) : null,
          full.traceback ? el('h2', { text: 'Error chain' }) : null,
          full.traceback ? el('pre', { id: 'detail-traceback', text: full.traceback }) : null,
        ].filter(Boolean));
        logsBox.replaceChildren(...(full.logs
          ? [el('h2', { text: 'Logs' }), el('pre', { id: 'detail-logs', text: full.logs })]
          : [el('p', { class: 'muted', id: 'detail-logs-none', text: 'No log lines.' })]));
      })
      .catch(e => logsBox.replaceChildren(el('p', { class: 'error-text', text: 'could not load the call: ' + e.message })));
  }

  function card(label, value, idName) {
    return el('div', { class: 'card' }, el('b', { id: idName, text: fmtNum(value) }), el('span', { text: label }));
  }

  function showRun(r, t) {
    run = r;
    statusEl.className = 'status ' + r.status;
    statusEl.textContent = r.status;
    cancelBtn.hidden = r.status !== 'RUNNING';
    const failed = t ? (t.by_status.find(([s]) => s === 'FAILED') || [0, 0])[1] : 0;
    cards.replaceChildren(
      card('calls', r.tasks, 'c-tasks'), card('completed', r.completed, 'c-completed'),
      card('executions', r.executions, 'c-executions'), card('failed', failed, 'c-failed'),
      card('cache hits', r.cache_hits, 'c-cache'), card('retries', r.retries, 'c-retries'),
      card('replayed', r.replayed, 'c-replayed'), card('cancelled', r.cancelled, 'c-cancelled'));
    facts.replaceChildren(...[
      el('dt', { text: 'Flow' }), el('dd', { text: r.flow }),
      el('dt', { text: 'Wall time' }), el('dd', { text: fmtDuration(r.wall_ms) }),
      el('dt', { text: 'Owner' }), el('dd', { text: r.owner || (r.status === 'RUNNING' ? 'this coordinator' : '—') }),
      r.parent_run_id ? el('dt', { text: 'Parent run' }) : null,
      r.parent_run_id ? el('dd', {}, el('a', { id: 'run-parent', href: '#/run/' + r.parent_run_id, text: r.parent_run_id })) : null,
      el('dt', { text: 'Parameters' }), el('dd', { text: t ? preview(t.params) : '' }),
      r.result !== null && r.result !== undefined ? el('dt', { text: 'Result' }) : null,
      r.result !== null && r.result !== undefined ? el('dd', { id: 'run-result', text: preview(r.result) }) : null,
      r.note ? el('dt', { text: 'Note' }) : null, r.note ? el('dd', { text: r.note }) : null,
    ].filter(Boolean));
    errorBox.replaceChildren(...(r.error ? [el('h2', { text: 'Error' }), el('pre', { class: 'error-text', text: r.error })] : []));
    if (t) {
      const keep = [fStatus.value, fTask.value];
      fStatus.replaceChildren(el('option', { value: '', text: 'any status' }),
        ...t.by_status.map(([s, n]) => el('option', { value: s, text: s + ' (' + fmtNum(n) + ')' })));
      fTask.replaceChildren(el('option', { value: '', text: 'any task' }),
        ...t.by_task.map(([s, n]) => el('option', { value: s, text: s + ' (' + fmtNum(n) + ')' })));
      // a filter chosen stays chosen while its status is absent for a moment
      for (const [sel, v] of [[fStatus, keep[0]], [fTask, keep[1]]]) {
        if (v && ![...sel.options].some(o => o.value === v)) sel.append(el('option', { value: v, text: v }));
        sel.value = v;
      }
      if (t.version !== table.version) {
        table.version = t.version;
        if (!fStatus.value && !fTask.value) table.matching = t.total;
        draw();
        drawTimeline();
      }
    }
  }

  let timelineBusy = false;
  async function drawTimeline() {
    if (timelineBusy) return;
    timelineBusy = true;
    try {
      const width = Math.max(100, canvas.clientWidth - LABEL_W);
      const t = await api('/api/runs/' + id + '/calls?' + new URLSearchParams({ limit: 1, offset: 1e15, width }));
      const lanes = t.timeline;
      const laneH = Math.max(8, Math.min(26, Math.floor(300 / Math.max(1, lanes.length))));
      canvas.width = LABEL_W + width;
      canvas.height = Math.max(60, lanes.length * laneH + 24);
      canvas.style.height = canvas.height + 'px';
      const g = canvas.getContext('2d');
      g.clearRect(0, 0, canvas.width, canvas.height);
      g.font = '11px system-ui, sans-serif';
      const max = Math.max(1, ...lanes.map(l => Math.max(0, ...l.running)));
      lanes.forEach((l, i) => {
        const y = i * laneH;
        g.fillStyle = '#374151';
        g.fillText(l.agent.slice(0, 22), 4, y + laneH - 6);
        for (let c = 0; c < l.running.length; c++) {
          const n = l.running[c];
          if (!n) continue;
          g.fillStyle = 'rgba(37,99,235,' + (0.25 + 0.75 * n / max).toFixed(3) + ')';
          g.fillRect(LABEL_W + c, y + 2, 1, laneH - 4);
          if (l.failed[c]) {
            g.fillStyle = 'rgba(185,28,28,0.9)';
            g.fillRect(LABEL_W + c, y + laneH - 5, 1, 3);
          }
        }
      });
      g.fillStyle = '#6b7280';
      const y = lanes.length * laneH + 16;
      for (let k = 0; k <= 4; k++) {
        const x = LABEL_W + Math.round((width - 1) * k / 4);
        g.fillRect(x, y - 14, 1, 4);
        const label = fmtDuration(Math.round(t.span_ms * k / 4));
        g.fillText(label, Math.min(x, canvas.width - g.measureText(label).width - 2), y);
      }
      if (!lanes.length) g.fillText('no attempt has started yet', LABEL_W, 20);
    } catch (_) { /* the next tick draws it */ } finally {
      timelineBusy = false;
    }
  }

  cancelBtn.addEventListener('click', async () => {
    if (!confirm('Cancel run ' + id + '? Its attempts stop and it ends FAILED.')) return;
    cancelBtn.disabled = true;
    try {
      showRun(await api('/api/runs/' + id + '/cancel', { method: 'POST', headers: { 'x-pinazu': 'cancel' } }), null);
    } catch (e) {
      errorBox.replaceChildren(el('pre', { class: 'error-text', text: 'cancel failed: ' + e.message }));
    } finally {
      cancelBtn.disabled = false;
    }
  });

  // live: one event a second while the run runs; the last one once it ended
  const source = new EventSource('/api/runs/' + id + '/live');
  source.addEventListener('run', ev => {
    const m = JSON.parse(ev.data);
    setLive(m.run && m.run.status === 'RUNNING');
    if (m.run) showRun(m.run, m.table);
    else errorBox.replaceChildren(el('pre', { class: 'error-text', text: m.error || 'unknown run' }));
    // (an error, e.g. during a takeover, is shown and the next event follows it)
    if (m.run && m.run.status !== 'RUNNING') source.close();
  });
  source.onerror = () => setLive(false);
  onLeave(() => source.close());
  window.__pinazuRun = { table, draw, get run() { return run; } };
}

route();
