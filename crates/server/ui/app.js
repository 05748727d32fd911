// The page of controlnet-serve: plain JavaScript, no build step (the server embeds this file).
// It only calls the server's own API (/v1/...), the same one every other client uses.

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => [...root.querySelectorAll(sel)];

// Used when GET /v1/limits fails (an older server): the shipped config/default.toml values.
const FALLBACK_LIMITS = {
  max_pixels: 1048576,
  min_side: 64,
  max_side: 8192,
  default_side: 512,
  max_steps: 150,
  default_steps: 20,
  max_images: 8,
  max_controls: 4,
  max_prompt_chars: 4000,
  schedulers: ['ddim', 'euler', 'euler-a', 'dpmpp-2m', 'dpmpp-2m-karras', 'unipc'],
  default_scheduler: 'unipc',
};
// Without the list, a unit can still send a ready-made hint.
const FALLBACK_PREPROCESSORS = [{ name: 'none', available: true, params: [] }];
const STORE = { key: 'cns.apiKey', admin: 'cns.adminKey' };
// How long after the last change a unit's hint preview is asked for.
const HINT_DELAY_MS = 300;

const state = {
  limits: FALLBACK_LIMITS,
  preprocessors: FALLBACK_PREPROCESSORS,
  adapters: [],
  units: [], // in page order, which is the request's `controls` order
  run: null, // the AbortController of the generation in flight
  defaultsFilled: false, // the form holds the server's defaults
};

// ---------------------------------------------------------------- small helpers

/** Makes an element: attributes (`on*` become listeners), then children. */
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'text') el.textContent = v;
    else if (k in el && !k.includes('-')) el[k] = v;
    else el.setAttribute(k, v === true ? '' : v);
  }
  el.append(...children.flat(Infinity).filter((c) => c !== null && c !== undefined));
  return el;
}

/** A number input's value, or undefined when empty (the server's default then applies). */
function num(el) {
  const v = el.value.trim();
  return v === '' ? undefined : Number(v);
}

function setValue(el, v) {
  el.value = v === undefined || v === null ? '' : String(v);
}

function mib(bytes) {
  return bytes == null ? '–' : `${(bytes / 1048576).toFixed(1)} MiB`;
}

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(r.result);
    r.onerror = () => reject(r.error);
    r.readAsDataURL(file);
  });
}

/** Base64 image bytes to an object URL (lighter for the page than a long data: URL). */
function blobURL(b64, mime) {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  return URL.createObjectURL(new Blob([bytes], { type: mime }));
}

// ---------------------------------------------------------------- the API

function authHeaders(admin) {
  const key = localStorage.getItem(admin ? STORE.admin : STORE.key);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

/** An error answer as an Error with the server's `status`, `type` and `field`. */
async function apiError(res, admin = false) {
  let body = null;
  try {
    body = await res.json();
  } catch {
    // not JSON (a proxy's page): the status says enough
  }
  return errorFrom(body, res.status, admin);
}

function errorFrom(body, status, admin = false) {
  let message = body?.error || `the server answered ${status}`;
  if (status === 401) message += admin ? ' (enter the admin key)' : ' (enter the API key at the top)';
  const e = new Error(message);
  Object.assign(e, { status, type: body?.type, field: body?.field ?? null });
  return e;
}

async function api(path, { method = 'GET', body, admin = false } = {}) {
  const headers = authHeaders(admin);
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const res = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!res.ok) throw await apiError(res, admin);
  return res.status === 204 ? null : res.json();
}

/**
 * The events of a text/event-stream body. EventSource cannot POST, so the stream is read
 * here: frames end at a blank line, `event:` names one, `data:` lines carry its JSON, and
 * lines starting with ':' are keep-alive comments.
 */
async function* sseEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value.replace(/\r\n?/g, '\n');
    let end;
    while ((end = buf.indexOf('\n\n')) >= 0) {
      const frame = buf.slice(0, end);
      buf = buf.slice(end + 2);
      let event = 'message';
      const data = [];
      for (const line of frame.split('\n')) {
        if (line.startsWith(':')) continue;
        const colon = line.indexOf(':');
        const key = colon < 0 ? line : line.slice(0, colon);
        const val = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '');
        if (key === 'event') event = val;
        else if (key === 'data') data.push(val);
      }
      if (data.length) yield { event, data: JSON.parse(data.join('\n')) };
    }
  }
}

// ---------------------------------------------------------------- messages and field errors

function say(text, where = $('#message')) {
  where.textContent = text || '';
  where.hidden = !text;
}

function clearFieldErrors(scope) {
  $$('.field-error', scope).forEach((e) => e.remove());
  $$('[aria-invalid]', scope).forEach((e) => {
    e.removeAttribute('aria-invalid');
    e.removeAttribute('aria-describedby');
  });
}

/**
 * The element whose data-field is `path`, or the nearest one above it: a path the page has
 * no input for (`controls[1].pose.people[0]`) lands on `controls[1].pose`, then `controls[1]`.
 */
function fieldElement(scope, path) {
  let p = path;
  while (p) {
    const el = scope.querySelector(`[data-field="${CSS.escape(p)}"]`);
    if (el) return el;
    const shorter = p.replace(/(\.[^.[\]]*|\[\d+\])$/, '');
    if (shorter === p) return null;
    p = shorter;
  }
  return null;
}

let errorIds = 0;

/**
 * Shows `err` next to the input its `field` names (inside `scope`), else in `fallback`.
 * `field` overrides err.field (detect's fields are a unit's own).
 */
function showError(scope, err, { field = err.field, fallback = $('#message') } = {}) {
  const el = field ? fieldElement(scope, field) : null;
  if (!el) {
    say(field ? `${field}: ${err.message}` : err.message, fallback);
    return;
  }
  const host = el.closest('.field') || el;
  const id = `field-error-${++errorIds}`;
  host.append(h('p', { class: 'field-error', id, 'data-for': field, text: err.message }));
  // The drop zone of `controls[i].image` is a label: its file input takes the focus.
  const input = el.matches('input, select, textarea') ? el : $('input, select, textarea', el);
  if (input) {
    input.setAttribute('aria-invalid', 'true');
    input.setAttribute('aria-describedby', id);
    input.focus({ preventScroll: true });
  }
  host.scrollIntoView({ block: 'nearest' });
}

// ---------------------------------------------------------------- limits and catalogs

/** Sizes the form to the server's limits. Its defaults fill the form once: from the first
 * answer that came (a 401 before the key is typed keeps them pending). */
async function loadLimits() {
  let known = true;
  try {
    state.limits = { ...FALLBACK_LIMITS, ...(await api('/v1/limits')) };
  } catch {
    known = false; // an older server without /v1/limits, or no key yet: the shipped defaults
  }
  const l = state.limits;
  const fill = !state.defaultsFilled;
  state.defaultsFilled ||= known;
  for (const el of [$('#width'), $('#height')]) {
    Object.assign(el, { min: l.min_side, max: l.max_side });
    if (fill) el.value = l.default_side;
  }
  $('#steps').max = l.max_steps;
  if (fill) $('#steps').value = l.default_steps;
  $('#num-images').max = l.max_images;
  const scheduler = $('#scheduler');
  const keep = fill ? l.default_scheduler : scheduler.value;
  scheduler.replaceChildren(...l.schedulers.map((s) => new Option(s, s)));
  scheduler.value = l.schedulers.includes(keep) ? keep : l.default_scheduler;
  renumber(); // max_controls may have changed
}

/** GET /v1/limits (which needs no key) says generation does, and none is stored. */
function needsKey() {
  return state.limits.api_key_required === true && !localStorage.getItem(STORE.key);
}

/** Models, adapters and preprocessors; a 401 says the key is missing or wrong. */
async function loadCatalog() {
  say('');
  const [models, adapters, pres] = await Promise.allSettled([
    api('/v1/models'),
    api('/v1/adapters'),
    api('/v1/preprocessors'),
  ]);
  const failed = [models, adapters, pres].find((r) => r.status === 'rejected');
  if (failed) say(`Could not load the server's lists: ${failed.reason.message}`);
  if (models.status === 'fulfilled') {
    const select = $('#model');
    const keep = select.value;
    select.replaceChildren(...models.value.map((m) => new Option(m.name, m.name, m.default)));
    if (keep && models.value.some((m) => m.name === keep)) select.value = keep;
  }
  if (pres.status === 'fulfilled') state.preprocessors = pres.value;
  if (adapters.status === 'fulfilled') setAdapters(adapters.value);
  for (const unit of state.units) fillPreprocessors(unit);
}

function setAdapters(list) {
  state.adapters = list;
  for (const unit of state.units) fillAdapters(unit);
  renderAdmin();
}

// ---------------------------------------------------------------- ControlNet units

function preprocessorInfo(name) {
  return state.preprocessors.find((p) => p.name === name);
}

/** What an option says about a preprocessor this server cannot run. */
function unavailableReason(p) {
  if (p.unsupported) return `not supported: ${p.unsupported}`;
  if (p.not_implemented) return 'not implemented here';
  if (p.missing_weights?.length) return `needs ${p.missing_weights.join(', ')}`;
  return 'unavailable';
}

function fillPreprocessors(unit) {
  const select = unit.pre;
  const keep = select.value;
  select.replaceChildren(
    ...state.preprocessors.map((p) => {
      const label = p.name === 'none' ? 'none (the image is the hint)' : p.name;
      const o = new Option(p.available ? label : `${label} (${unavailableReason(p)})`, p.name);
      o.disabled = !p.available;
      return o;
    }),
  );
  const usable = (n) => preprocessorInfo(n)?.available;
  select.value = usable(keep) ? keep : usable('canny') ? 'canny' : 'none';
  if (select.value !== keep) renderParams(unit);
}

function fillAdapters(unit) {
  const select = unit.adapter;
  const keep = select.value;
  select.replaceChildren(...state.adapters.map((a) => new Option(a.name, a.name)));
  if (keep && state.adapters.some((a) => a.name === keep)) select.value = keep;
  else guessAdapter(unit, true);
}

/** Picks the adapter named like the preprocessor (canny → canny, openpose_full → openpose)
 * until the user chooses one. */
function guessAdapter(unit, force = false) {
  if (unit.adapterChosen && !force) return;
  const pre = unit.pre.value;
  const hit = state.adapters.find(
    (a) => pre === a.name || pre.startsWith(`${a.name}_`) || pre.split('_').includes(a.name),
  );
  if (hit) unit.adapter.value = hit.name;
}

/** The preprocessor's parameters as sliders with their live values. */
function renderParams(unit, values = {}) {
  const p = preprocessorInfo(unit.pre.value);
  unit.res.placeholder = p?.default_resolution ? String(p.default_resolution) : '';
  unit.res.closest('.field').hidden = !p || p.name === 'none';
  unit.params.replaceChildren(
    ...(p?.params ?? []).map((spec) => {
      const input = h('input', {
        type: 'range',
        min: spec.min,
        max: spec.max,
        step: spec.step,
        'data-key': `params.${spec.name}`,
        'data-param': spec.name,
      });
      input.value = values[spec.name] ?? spec.default;
      const out = h('output', { text: input.value });
      input.addEventListener('input', () => {
        out.value = input.value;
        scheduleHint(unit);
      });
      return h('div', { class: 'field' }, h('label', {}, `${spec.label} `, out, input));
    }),
  );
  renumber();
}

/** Numbers the units and points their inputs' data-field at `controls[i].…`. */
function renumber() {
  state.units.forEach((u, i) => {
    $('.unit-n', u.el).textContent = i + 1;
    u.el.dataset.field = `controls[${i}]`;
    for (const el of $$('[data-key]', u.el)) el.dataset.field = `controls[${i}].${el.dataset.key}`;
  });
  $('#add-unit').disabled = state.units.length >= state.limits.max_controls;
}

function addUnit(settings) {
  if (state.units.length >= state.limits.max_controls) return null;
  const el = $('#unit-template').content.firstElementChild.cloneNode(true);
  const unit = {
    el,
    image: null, // a data: URL
    hintSeq: 0,
    timer: 0,
    adapterChosen: false,
    pre: $('.preprocessor', el),
    res: $('.processor-res', el),
    params: $('.params', el),
    adapter: $('.adapter', el),
    hint: $('.hint', el),
    hintStatus: $('.hint-status', el),
  };
  state.units.push(unit);
  $('#units').append(el);
  fillPreprocessors(unit);
  fillAdapters(unit);
  renderParams(unit);
  guessAdapter(unit);

  const file = $('.file', el);
  file.addEventListener('change', () => setImage(unit, file.files[0]));
  const drop = $('.drop', el);
  drop.addEventListener('dragover', (e) => {
    e.preventDefault();
    drop.classList.add('over');
  });
  drop.addEventListener('dragleave', () => drop.classList.remove('over'));
  drop.addEventListener('drop', (e) => {
    e.preventDefault();
    drop.classList.remove('over');
    setImage(unit, e.dataTransfer.files[0]);
  });
  unit.pre.addEventListener('change', () => {
    renderParams(unit);
    guessAdapter(unit);
    scheduleHint(unit, 0);
  });
  unit.res.addEventListener('input', () => scheduleHint(unit));
  unit.adapter.addEventListener('change', () => (unit.adapterChosen = true));
  $('.remove', el).addEventListener('click', () => removeUnit(unit));

  if (settings) applyUnit(unit, settings);
  renumber();
  return unit;
}

function removeUnit(unit) {
  clearTimeout(unit.timer);
  unit.hintSeq++; // an answer still on its way is dropped
  state.units.splice(state.units.indexOf(unit), 1);
  unit.el.remove();
  renumber();
  $('#add-unit').focus();
}

/** A unit's inputs from a `controls[i]` of an earlier request. */
function applyUnit(unit, c) {
  if (c.preprocessor && preprocessorInfo(c.preprocessor)) unit.pre.value = c.preprocessor;
  renderParams(unit, c.params);
  setValue(unit.res, c.processor_res);
  if (state.adapters.some((a) => a.name === c.adapter)) {
    unit.adapter.value = c.adapter;
    unit.adapterChosen = true;
  }
  for (const key of ['scale', 'start', 'end', 'control_mode', 'resize_mode']) {
    if (c[key] !== undefined) setValue($(`[data-key="${key}"]`, unit.el), c[key]);
  }
  if (c.image) showSource(unit, c.image);
}

async function setImage(unit, file) {
  if (!file) return;
  if (!file.type.startsWith('image/')) {
    unit.hintStatus.textContent = `${file.name} is not an image`;
    return;
  }
  showSource(unit, await readAsDataURL(file));
}

function showSource(unit, dataURL) {
  unit.image = dataURL;
  const img = $('.source', unit.el);
  img.src = dataURL;
  img.hidden = false;
  $('.drop-text', unit.el).textContent = 'Drop, paste or pick another image';
  scheduleHint(unit, 0);
}

/** The preview follows the inputs, once they have been still for a moment. */
function scheduleHint(unit, delay = HINT_DELAY_MS) {
  clearTimeout(unit.timer);
  unit.timer = setTimeout(() => refreshHint(unit), delay);
}

function paramsOf(unit) {
  const params = {};
  for (const input of $$('[data-param]', unit.params)) params[input.dataset.param] = Number(input.value);
  return params;
}

async function refreshHint(unit) {
  const seq = ++unit.hintSeq;
  clearFieldErrors(unit.el);
  if (!unit.image) return;
  const pre = unit.pre.value;
  if (pre === 'none') {
    showHint(unit, unit.image, 'the image is the hint');
    return;
  }
  unit.hintStatus.textContent = `${pre}…`;
  try {
    const body = { preprocessor: pre, image: unit.image, params: paramsOf(unit) };
    if (num(unit.res) !== undefined) body.processor_res = num(unit.res);
    const out = await api('/v1/detect', { method: 'POST', body });
    if (seq !== unit.hintSeq) return; // a newer preview was asked for meanwhile
    showHint(unit, `data:image/png;base64,${out.image}`, `${pre}: ${out.width}×${out.height}`);
  } catch (e) {
    if (seq !== unit.hintSeq) return;
    unit.hint.hidden = true;
    unit.hintStatus.textContent = 'no hint';
    // /v1/detect names the unit's own fields (`params.low_threshold`): put them on this unit.
    const i = state.units.indexOf(unit);
    showError(unit.el, e, { field: `controls[${i}].${e.field || 'image'}` });
  }
}

function showHint(unit, src, text) {
  unit.hint.src = src;
  unit.hint.hidden = false;
  unit.hintStatus.textContent = text;
}

/** The first image on the clipboard goes to the focused unit, else the first without one. */
function onPaste(e) {
  const item = [...(e.clipboardData?.items ?? [])].find(
    (i) => i.kind === 'file' && i.type.startsWith('image/'),
  );
  if (!item) return; // text: the browser pastes it as usual
  e.preventDefault();
  const unit =
    state.units.find((u) => u.el.contains(document.activeElement)) ??
    state.units.find((u) => !u.image) ??
    addUnit() ??
    state.units.at(-1);
  setImage(unit, item.getAsFile());
}

// ---------------------------------------------------------------- generating

/** The request as the form says. Empty number inputs are left out (server defaults). */
function collectRequest() {
  const req = {
    prompt: $('#prompt').value,
    negative_prompt: $('#negative').value,
    width: num($('#width')),
    height: num($('#height')),
    steps: num($('#steps')),
    guidance_scale: num($('#guidance')),
    scheduler: $('#scheduler').value,
    num_images: num($('#num-images')),
    model: $('#model').value || undefined,
    seed: $('#seed-random').checked ? undefined : num($('#seed')),
    return_hints: true,
    controls: state.units.map((u) => {
      const pre = u.pre.value;
      return {
        adapter: u.adapter.value,
        image: u.image ?? undefined,
        preprocessor: pre,
        params: pre === 'none' ? undefined : paramsOf(u),
        processor_res: pre === 'none' ? undefined : num(u.res),
        scale: num($('[data-key="scale"]', u.el)),
        start: num($('[data-key="start"]', u.el)),
        end: num($('[data-key="end"]', u.el)),
        control_mode: $('[data-key="control_mode"]', u.el).value,
        resize_mode: $('[data-key="resize_mode"]', u.el).value,
      };
    }),
  };
  // JSON.stringify drops the undefined ones.
  return JSON.parse(JSON.stringify(req));
}

function setProgress(step, total) {
  const bar = $('#step-bar');
  bar.max = total;
  bar.value = step;
  $('#step-pct').textContent = `${Math.round((100 * step) / total)} %`;
}

function setStatus(text) {
  $('#run-status').textContent = text;
}

function setRunning(on) {
  $('#progress-area').hidden = false;
  $('#generate').disabled = on;
  $('#cancel').disabled = !on;
}

async function generate(e) {
  e.preventDefault();
  if (state.run) return;
  clearFieldErrors($('#gen-form'));
  say('');
  const req = collectRequest();
  const run = new AbortController();
  state.run = run;
  setRunning(true);
  setProgress(0, 1);
  setStatus('Sending…');
  const t0 = performance.now();
  try {
    const res = await fetch('/v1/generate/stream', {
      method: 'POST',
      headers: { ...authHeaders(false), 'Content-Type': 'application/json' },
      body: JSON.stringify(req),
      signal: run.signal,
    });
    // A bad request is answered before the stream starts, as a plain error.
    if (!res.ok) throw await apiError(res);
    let result = null;
    let total = 1;
    for await (const { event, data } of sseEvents(res.body)) {
      if (event === 'queued') {
        setStatus(data.position ? `Queued: ${data.position} ahead` : 'Queued: next');
      } else if (event === 'started') setStatus('Running');
      else if (event === 'step') {
        total = data.total;
        setProgress(data.step, total);
        setStatus(`Running: step ${data.step} of ${data.total}`);
      } else if (event === 'done') result = data;
      else if (event === 'error') throw errorFrom(data, 500);
    }
    if (!result) throw new Error('the stream ended without a result');
    setProgress(total, total);
    setStatus(`Done in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
    addResults(req, result);
  } catch (err) {
    if (run.signal.aborted) {
      setStatus('Cancelled');
    } else {
      // A 4xx came before the stream started: nothing ran.
      setStatus(`${err.status >= 400 && err.status < 500 ? 'Refused' : 'Failed'}: ${err.message}`);
      showError($('#gen-form'), err);
    }
  } finally {
    state.run = null;
    setRunning(false);
  }
}

/** Closing the stream is what cancels the job on the server. */
function cancel() {
  if (state.run) {
    setStatus('Cancelling…');
    state.run.abort();
  }
}

function summary(req, seed, result) {
  const rows = [
    ['Seed', seed],
    ['Size', `${req.width ?? state.limits.default_side}×${req.height ?? state.limits.default_side}`],
    ['Steps', req.steps ?? state.limits.default_steps],
    ['Guidance', req.guidance_scale ?? 7.5],
    ['Scheduler', req.scheduler],
    ['Model', req.model ?? 'default'],
    ['Time', `${(result.timings.total_ms / 1000).toFixed(1)} s`],
    ...req.controls.map((c, i) => [
      `Unit ${i + 1}`,
      `${c.adapter} × ${c.scale ?? 1}, ${c.preprocessor}, ${c.start ?? 0}–${c.end ?? 1}`,
    ]),
  ];
  if (req.prompt) rows.unshift(['Prompt', req.prompt]);
  return h('dl', {}, rows.map(([k, v]) => [h('dt', { text: k }), h('dd', { text: String(v) })]));
}

function addResults(req, result) {
  const mime = `image/${result.format}`;
  const ext = result.format === 'jpeg' ? 'jpg' : result.format;
  const hints = (result.hints ?? []).map((b64) => blobURL(b64, 'image/png'));
  const cards = result.images.map((b64, k) => {
    const seed = result.seeds[k];
    const url = blobURL(b64, mime);
    return h(
      'article',
      { class: 'card', 'data-testid': 'result' },
      h(
        'div',
        { class: 'card-images' },
        h('img', { src: url, alt: `generated image, seed ${seed}`, 'data-testid': 'result-image' }),
        hints.map((src, i) =>
          h('img', { src, class: 'card-hint', alt: `hint of unit ${i + 1}`, 'data-testid': 'result-hint' }),
        ),
      ),
      summary(req, seed, result),
      h(
        'div',
        { class: 'actions' },
        h('a', { href: url, download: `controlnet-${seed}.${ext}`, class: 'button' }, 'Download'),
        h('button', { type: 'button', 'data-testid': 'reuse', onclick: () => restore(req, seed) }, 'Use these settings again'),
      ),
    );
  });
  $('#gallery').prepend(...cards);
}

/** The form as it was for an earlier result, with that image's seed fixed. */
function restore(req, seed) {
  $('#prompt').value = req.prompt;
  $('#negative').value = req.negative_prompt ?? '';
  setValue($('#width'), req.width);
  setValue($('#height'), req.height);
  setValue($('#steps'), req.steps);
  setValue($('#guidance'), req.guidance_scale);
  setValue($('#num-images'), 1);
  if (req.scheduler) $('#scheduler').value = req.scheduler;
  if (req.model) $('#model').value = req.model;
  $('#seed-random').checked = false;
  $('#seed').disabled = false;
  $('#seed').value = seed;
  for (const u of [...state.units]) removeUnit(u);
  for (const c of req.controls) addUnit(c);
  clearFieldErrors($('#gen-form'));
  $('#prompt').focus();
  $('#prompt').scrollIntoView({ block: 'nearest' });
}

// ---------------------------------------------------------------- admin: adapters

function renderAdmin() {
  const rows = state.adapters.map((a) =>
    h(
      'tr',
      {},
      h('td', { text: a.name }),
      h('td', { text: a.source }),
      h('td', { text: mib(a.bytes) }),
      h('td', { text: a.resident ? 'yes' : 'no' }),
      h('td', { text: a.in_use }),
      h(
        'td',
        {},
        h('button', { type: 'button', 'data-testid': `unload-${a.name}`, onclick: () => unload(a.name) }, 'Unload'),
      ),
    ),
  );
  $('#adapter-rows').replaceChildren(...rows);
  const resident = state.adapters.filter((a) => a.resident).reduce((s, a) => s + (a.bytes ?? 0), 0);
  $('#admin-total').textContent = `${state.adapters.length} adapters, ${mib(resident)} on the device`;
}

async function refreshAdapters() {
  try {
    setAdapters(await api('/v1/adapters'));
  } catch (e) {
    say(e.message, $('#admin-message'));
  }
}

async function unload(name) {
  say('', $('#admin-message'));
  try {
    await api(`/v1/adapters/${encodeURIComponent(name)}`, { method: 'DELETE', admin: true });
    say(`Unloaded ${name}`, $('#admin-message'));
  } catch (e) {
    say(`Unloading ${name}: ${e.message}`, $('#admin-message'));
  }
  await refreshAdapters();
}

async function load(e) {
  e.preventDefault();
  const form = $('#load-form');
  clearFieldErrors(form);
  say('', $('#admin-message'));
  const name = $('#load-name').value.trim();
  try {
    const info = await api(`/v1/adapters/${encodeURIComponent(name)}`, {
      method: 'PUT',
      admin: true,
      body: { path: $('#load-path').value.trim() },
    });
    say(`Loaded ${info.name} (${mib(info.bytes)})`, $('#admin-message'));
    await refreshAdapters();
  } catch (err) {
    showError(form, err, { fallback: $('#admin-message') });
  }
}

// ---------------------------------------------------------------- start

/** A key field kept in local storage under `store`. */
function keyField(input, store, onChange) {
  input.value = localStorage.getItem(store) ?? '';
  input.addEventListener('change', () => {
    const key = input.value.trim();
    if (key) localStorage.setItem(store, key);
    else localStorage.removeItem(store);
    onChange?.();
  });
}

async function start() {
  keyField($('#api-key'), STORE.key, async () => {
    await loadLimits();
    await loadCatalog();
  });
  keyField($('#admin-key'), STORE.admin);
  // Enter in a key field commits it (a change event), nothing to submit.
  for (const f of $$('.key-form')) f.addEventListener('submit', (e) => e.preventDefault());
  $('#seed-random').addEventListener('change', (e) => {
    $('#seed').disabled = e.target.checked;
  });
  $('#add-unit').addEventListener('click', () => {
    const unit = addUnit();
    $('.file', unit?.el ?? document).focus();
  });
  $('#gen-form').addEventListener('submit', generate);
  $('#cancel').addEventListener('click', cancel);
  $('#load-form').addEventListener('submit', load);
  $('#refresh-adapters').addEventListener('click', refreshAdapters);
  document.addEventListener('paste', onPaste);
  await loadLimits();
  if (needsKey()) {
    // Not a 401 per list (each one an error in the console): ask for the key first.
    say('This server needs an API key: enter it above.');
    $('#api-key').focus();
  } else {
    await loadCatalog();
  }
  addUnit();
  document.body.dataset.ready = 'true'; // for the browser test
}

start();
