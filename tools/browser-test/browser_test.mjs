// The page at `/` in headless Chromium, against a running server on its embedded model:
// upload, canny preview, a second unit (dropped, used as a ready-made hint), a generation
// streamed to 100 %, the result in the gallery with its hints, "use these settings again",
// a cancelled long run (after which the server still works), field errors for bad values,
// and a phone-size screenshot. Any console error or warning, page error, failed request or
// error response that the step did not expect fails the test.
// Usage: node browser_test.mjs <base-url> [screenshot-dir]   (run.sh starts the server)
import { chromium } from 'playwright-core';
import { existsSync, mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

// What the test finds on the page: change these when the page changes.
const SEL = {
  ready: 'body[data-ready="true"]',
  units: '[data-testid="unit"]',
  unitFile: '[data-testid="unit-file"]',
  unitDrop: '.drop',
  unitPreprocessor: '[data-testid="unit-preprocessor"]',
  unitAdapter: '[data-testid="unit-adapter"]',
  unitScale: '[data-testid="unit-scale"]',
  unitParam: (name) => `input[data-param="${name}"]`,
  hintPreview: '[data-testid="hint-preview"]',
  addUnit: '#add-unit',
  width: '#width',
  height: '#height',
  steps: '#steps',
  seed: '#seed',
  seedRandom: '#seed-random',
  generate: '#generate',
  cancel: '#cancel',
  runStatus: '#run-status',
  stepBar: '#step-bar',
  stepPct: '#step-pct',
  message: '#message',
  results: '[data-testid="result"]',
  resultImage: '[data-testid="result-image"]',
  resultHint: '[data-testid="result-hint"]',
  reuse: '[data-testid="reuse"]',
  apiKey: '#api-key',
  adminOpen: '#admin summary',
  adapterRows: '#adapter-rows tr',
  unload: (name) => `[data-testid="unload-${name}"]`,
  loadName: '#load-name',
  loadPath: '#load-path',
  loadSubmit: '#load-form button[type="submit"]',
  adminMessage: '#admin-message',
  // The error shown next to the input whose data-field is `path`.
  fieldError: (path) => `.field:has([data-field="${path}"]) > .field-error`,
};

const SMALL = { side: 128, steps: 4 }; // ~1 s in the debug build
const LONG = { side: 256, steps: 150 }; // ~1 s a step in the debug build: cancelled early
const QUICK = { side: 64, steps: 2 };

const base = process.argv[2]?.replace(/\/$/, '');
if (!base) {
  console.error('usage: node browser_test.mjs <base-url> [screenshot-dir]');
  process.exit(2);
}
const outDir = process.argv[3] ?? mkdtempSync(join(tmpdir(), 'browser-test-'));
const CHROMIUM = ['/usr/lib/chromium/chromium', '/usr/bin/chromium'].find((p) => existsSync(p));
const t0 = Date.now();
const log = (line) => console.log(`[${((Date.now() - t0) / 1000).toFixed(1).padStart(5)} s] ${line}`);

// ---------------------------------------------------------------- what counts as a failure

const problems = [];
let expected = []; // deliberate failures the current step allows: {what, re}

function observe(what, text) {
  const line = `${what}: ${text}`;
  const i = expected.findIndex((e) => e.re.test(line));
  if (i >= 0) expected[i].seen = true;
  else problems.push(line);
}

function watch(page) {
  page.on('console', (m) => {
    if (m.type() === 'error' || m.type() === 'warning') {
      observe(`console ${m.type()}`, `${m.text()} (${m.location().url || 'page'})`);
    }
  });
  page.on('pageerror', (e) => observe('page error', e.message));
  page.on('requestfailed', (r) => observe('request failed', `${r.method()} ${r.url()} ${r.failure()?.errorText}`));
  page.on('response', (r) => {
    if (r.status() >= 400) observe('response', `${r.status()} ${r.request().method()} ${r.url()}`);
  });
}

let page;
let stepName = '';

async function step(name, fn, allow = []) {
  stepName = name;
  expected = allow.map((re) => ({ re, seen: false }));
  const started = Date.now();
  try {
    await fn();
    // Console messages arrive asynchronously: give them a moment before judging the step.
    await page.waitForTimeout(100);
    if (problems.length) throw new Error(`unexpected:\n  ${problems.join('\n  ')}`);
  } catch (e) {
    await failureReport();
    throw e;
  }
  expected = [];
  log(`ok   ${name} (${Date.now() - started} ms)`);
}

/** What the page showed when a step failed: its status lines and a screenshot. */
async function failureReport() {
  try {
    const text = async (sel) => (await page.textContent(sel, { timeout: 1000 }))?.trim();
    console.error(`  page says: "${await text(SEL.runStatus)}" / "${await text(SEL.message)}"`);
    await shot(page, 'failure');
  } catch (e) {
    console.error(`  (no screenshot: ${e.message})`);
  }
}

function check(cond, message) {
  if (!cond) throw new Error(message);
}

async function shot(p, name) {
  const path = join(outDir, `${name}.png`);
  await p.screenshot({ path, fullPage: true });
  log(`screenshot ${path}`);
}

async function waitReady() {
  for (let i = 0; i < 600; i++) {
    try {
      if ((await fetch(`${base}/ready`)).ok) return;
    } catch {
      // not listening yet
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`${base}/ready never answered 200`);
}

// ---------------------------------------------------------------- page helpers

const unit = (i) => page.locator(SEL.units).nth(i);

/** A picture with edges for canny, drawn on a canvas in the page (PNG bytes). */
async function testImage() {
  const dataURL = await page.evaluate(() => {
    const c = document.createElement('canvas');
    c.width = 160;
    c.height = 120;
    const g = c.getContext('2d');
    g.fillStyle = '#dde';
    g.fillRect(0, 0, 160, 120);
    g.fillStyle = '#236';
    g.beginPath();
    g.arc(60, 60, 35, 0, Math.PI * 2);
    g.fill();
    g.fillStyle = '#c42';
    g.fillRect(95, 20, 50, 80);
    return c.toDataURL('image/png');
  });
  return Buffer.from(dataURL.split(',')[1], 'base64');
}

async function hintSrc(i) {
  return unit(i).locator(SEL.hintPreview).getAttribute('src');
}

/** Waits for unit i's preview to show an image (other than `previous`) that has loaded. */
async function waitHint(i, previous = null) {
  await page.waitForFunction(
    ({ i, previous, sel }) => {
      const img = document.querySelectorAll(sel.units)[i]?.querySelector(sel.hint);
      return img && !img.hidden && img.src && img.src !== previous && img.complete && img.naturalWidth > 0;
    },
    { i, previous, sel: { units: SEL.units, hint: SEL.hintPreview } },
    { timeout: 15000 },
  );
  return hintSrc(i);
}

/** Sets a value the way a person's typing would (an input event, then change). */
async function setField(locator, value) {
  await locator.evaluate((el, v) => {
    el.value = v;
    el.dispatchEvent(new Event('input', { bubbles: true }));
    el.dispatchEvent(new Event('change', { bubbles: true }));
  }, String(value));
}

async function setSize(side, steps) {
  await page.fill(SEL.width, String(side));
  await page.fill(SEL.height, String(side));
  await page.fill(SEL.steps, String(steps));
}

/** Records every text the percentage shows, to see the progress move. */
async function recordProgress() {
  await page.evaluate((sel) => {
    window.__pcts = [];
    const el = document.querySelector(sel);
    new MutationObserver(() => window.__pcts.push(el.textContent)).observe(el, {
      childList: true,
      characterData: true,
      subtree: true,
    });
  }, SEL.stepPct);
}

async function waitStatus(re, timeout) {
  await page.waitForFunction(
    ({ sel, src }) => new RegExp(src).test(document.querySelector(sel)?.textContent ?? ''),
    { sel: SEL.runStatus, src: re.source },
    { timeout },
  );
}

// ---------------------------------------------------------------- the flow

async function main() {
  check(CHROMIUM, 'no Chromium at /usr/lib/chromium/chromium or /usr/bin/chromium (apt-get install chromium)');
  log(`screenshots in ${outDir}`);
  await waitReady();
  log(`server ready at ${base}`);
  // --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: ['--no-sandbox'] });
  try {
    await desktop(browser);
    await phone(browser);
    if (process.env.KEYED_URL) await keyed(browser, process.env.KEYED_URL, process.env.KEYED_KEY);
  } finally {
    await browser.close();
  }
}

async function desktop(browser) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  page = await context.newPage();
  watch(page);
  page.setDefaultTimeout(15000);

  await step('load the page (with its CSP)', async () => {
    const res = await page.goto(`${base}/`);
    check(res.ok(), `GET / answered ${res.status()}`);
    const csp = res.headers()['content-security-policy'] ?? '';
    check(csp.includes("script-src 'self'"), `no strict CSP on the page: "${csp}"`);
    await page.waitForSelector(SEL.ready);
    check((await page.locator(SEL.units).count()) === 1, 'the page starts with one unit');
  });

  const png = await testImage();
  await step('upload an image to unit 1', async () => {
    await unit(0).locator(SEL.unitFile).setInputFiles({ name: 'shapes.png', mimeType: 'image/png', buffer: png });
    await unit(0).locator('img.source').waitFor({ state: 'visible' });
  });

  let first;
  await step('choose canny: the hint preview appears', async () => {
    await unit(0).locator(SEL.unitPreprocessor).selectOption('canny');
    first = await waitHint(0);
    check(first.startsWith('data:image/png'), 'the preview is not the detected PNG');
    check((await unit(0).locator(SEL.unitAdapter).inputValue()) === 'canny', 'adapter canny not picked for canny');
  });

  await step('move a canny slider: the preview is detected again with it', async () => {
    // The same edges may come back (the same PNG): watch for the request rather than the src.
    const detected = page.waitForResponse(
      (r) => r.url().endsWith('/v1/detect') && r.request().postDataJSON()?.params?.low_threshold === 20,
    );
    await setField(unit(0).locator(SEL.unitParam('low_threshold')), 20);
    check((await detected).ok(), 'the new detect failed');
    check((await unit(0).locator('output').first().textContent()) === '20', 'the slider value is not shown');
    await waitHint(0);
  });

  await step('add a second unit, drop a ready-made hint on it', async () => {
    await page.click(SEL.addUnit);
    check((await page.locator(SEL.units).count()) === 2, 'no second unit');
    await unit(1).locator(SEL.unitPreprocessor).selectOption('none');
    await unit(1).locator(SEL.unitAdapter).selectOption('scribble');
    await unit(1).locator(SEL.unitDrop).evaluate((el, b64) => {
      const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
      const dt = new DataTransfer();
      dt.items.add(new File([bytes], 'hint.png', { type: 'image/png' }));
      el.dispatchEvent(new DragEvent('drop', { dataTransfer: dt, bubbles: true, cancelable: true }));
    }, png.toString('base64'));
    await waitHint(1);
  });

  let seed;
  await step(`generate ${SMALL.side}×${SMALL.side}, ${SMALL.steps} steps: progress reaches 100 %`, async () => {
    await setSize(SMALL.side, SMALL.steps);
    await recordProgress();
    await page.click(SEL.generate);
    await waitStatus(/^Done/, 60000);
    const pct = await page.textContent(SEL.stepPct);
    check(pct === '100 %', `the progress ends at "${pct}"`);
    const bar = await page.$eval(SEL.stepBar, (b) => [b.value, b.max]);
    check(bar[0] === SMALL.steps && bar[1] === SMALL.steps, `the bar ends at ${bar}`);
    const seen = await page.evaluate(() => window.__pcts);
    check(seen.some((t) => t !== '0 %' && t !== '100 %'), `no step between 0 and 100 % was shown: ${seen}`);
  });

  await step('the image is in the gallery with both hints', async () => {
    const card = page.locator(SEL.results).first();
    check((await page.locator(SEL.results).count()) === 1, 'not one result card');
    const size = await card.locator(SEL.resultImage).evaluate((i) => [i.naturalWidth, i.naturalHeight]);
    check(size[0] === SMALL.side && size[1] === SMALL.side, `the result is ${size}`);
    const hints = await card.locator(SEL.resultHint).evaluateAll((is) => is.map((i) => i.naturalWidth));
    check(hints.length === 2 && hints.every((w) => w > 0), `hints beside the image: ${hints}`);
    const link = card.locator('a[download]');
    check((await link.getAttribute('href')).startsWith('blob:'), 'no download link');
    seed = (await card.locator('dd').allTextContents()).find((t) => /^\d+$/.test(t));
    check(seed, 'no seed in the card');
    await shot(page, 'desktop-result');
  });

  await step('use these settings again: seed fixed, units restored', async () => {
    await page.fill(SEL.steps, '7');
    await page.locator(SEL.results).first().locator(SEL.reuse).click();
    check((await page.inputValue(SEL.seed)) === seed, 'the seed was not restored');
    check(!(await page.isChecked(SEL.seedRandom)), 'the seed is still random');
    check((await page.inputValue(SEL.steps)) === String(SMALL.steps), 'steps not restored');
    check((await page.locator(SEL.units).count()) === 2, 'units not restored');
    check((await unit(1).locator(SEL.unitPreprocessor).inputValue()) === 'none', 'unit 2 not restored');
    await waitHint(0);
    await waitHint(1);
  });

  // The aborted stream may be reported as a failed request: that is the point of this step.
  await step(
    `cancel a ${LONG.side}×${LONG.side}, ${LONG.steps}-step run while it runs`,
    async () => {
      await setSize(LONG.side, LONG.steps);
      await page.click(SEL.generate);
      await waitStatus(/^Running: step/, 30000);
      await page.click(SEL.cancel);
      await waitStatus(/^Cancelled$/, 5000);
      check(await page.isEnabled(SEL.generate), 'Generate stays disabled after cancel');
      check((await page.locator(SEL.results).count()) === 1, 'the cancelled run added a result');
    },
    [/^request failed: POST \S+\/v1\/generate\/stream net::ERR_ABORTED/],
  );

  await step('the server still works: a quick run right after', async () => {
    check((await fetch(`${base}/ready`)).ok, '/ready is not 200 after the cancel');
    await setSize(QUICK.side, QUICK.steps);
    // A job still running would hold the worker for minutes: done within seconds means cancelled.
    await page.click(SEL.generate);
    await waitStatus(/^Done/, 20000);
    check((await page.locator(SEL.results).count()) === 2, 'the quick run added no result');
  });

  // Chromium logs each error response as a console error; these are the deliberate ones.
  const refused = [/^response: 422 POST \S+\/v1\/generate\/stream$/, /^console error: Failed to load resource: .* 422/];
  await step(
    'steps above the limit: the error is next to Steps',
    async () => {
      await page.fill(SEL.steps, '9999'); // the input's max does not block sending (novalidate)
      await page.click(SEL.generate);
      const err = page.locator(SEL.fieldError('steps'));
      await err.waitFor();
      check(/steps/.test(await err.textContent()), `the message: ${await err.textContent()}`);
      check(await page.locator(SEL.message).isHidden(), 'the error also went to the general area');
      check((await page.getAttribute(SEL.steps, 'aria-invalid')) === 'true', 'Steps not marked invalid');
      await shot(page, 'desktop-field-error');
    },
    refused,
  );

  await step(
    "unit 2's weight out of range: the error is next to that weight",
    async () => {
      await page.fill(SEL.steps, String(QUICK.steps));
      await unit(1).locator(SEL.unitScale).fill('5');
      await page.click(SEL.generate);
      const err = page.locator(SEL.fieldError('controls[1].scale'));
      await err.waitFor();
      check(/scale/.test(await err.textContent()), `the message: ${await err.textContent()}`);
      check((await unit(1).locator('.field-error').count()) === 1, 'the error is not in unit 2');
      check((await unit(0).locator('.field-error').count()) === 0, 'an error in unit 1');
      check((await page.locator(SEL.fieldError('steps')).count()) === 0, 'the old steps error stayed');
    },
    refused,
  );

  await step('admin: adapters listed; unload one, load it again', async () => {
    await page.click(SEL.adminOpen);
    await page.locator(SEL.adapterRows).nth(3).waitFor();
    check((await page.locator(SEL.adapterRows).count()) === 4, 'not the 4 default adapters');
    await page.click(SEL.unload('depth'));
    await page.locator(SEL.unload('depth')).waitFor({ state: 'detached' });
    const options = await unit(0).locator(`${SEL.unitAdapter} option`).allTextContents();
    check(!options.includes('depth'), `the units still offer depth: ${options}`);
    await page.fill(SEL.loadName, 'depth');
    await page.fill(SEL.loadPath, 'embedded:2');
    await page.click(SEL.loadSubmit);
    await page.locator(SEL.unload('depth')).waitFor();
    check(/Loaded depth/.test(await page.textContent(SEL.adminMessage)), 'no "Loaded" message');
  });

  await step(
    'admin: a path outside the roots: the error is next to Path',
    async () => {
      await page.fill(SEL.loadName, 'other');
      await page.fill(SEL.loadPath, 'no/such/controlnet.safetensors');
      await page.click(SEL.loadSubmit);
      await page.locator(SEL.fieldError('path')).waitFor();
      await shot(page, 'desktop-admin');
    },
    [/^response: 40\d PUT \S+\/v1\/adapters\/other$/, /^console error: Failed to load resource: .* 40\d/],
  );
  await context.close();
}

/** A server with an API key: the page asks for it before any keyed call (so no 401 in the
 * console), works once it is typed, and remembers it (local storage) after a reload. */
async function keyed(browser, keyedBase, key) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  page = await context.newPage();
  watch(page);
  page.setDefaultTimeout(15000);
  await step('a server with keys: the page asks for the key, no 401 on load', async () => {
    await page.goto(`${keyedBase}/`);
    await page.waitForSelector(SEL.ready);
    const message = await page.textContent(SEL.message);
    check(/needs an API key/.test(message), `the message: "${message}"`);
  });
  await step('type the key: the lists load and a generation runs', async () => {
    await page.fill(SEL.apiKey, key);
    await page.press(SEL.apiKey, 'Tab'); // a change event commits it
    await page.waitForFunction(
      (sel) => [...document.querySelectorAll(sel)].some((o) => o.value === 'canny'),
      `${SEL.unitPreprocessor} option`,
    );
    // A keyed /v1/detect (the preview), then a keyed stream.
    await unit(0).locator(SEL.unitFile).setInputFiles({ name: 'shapes.png', mimeType: 'image/png', buffer: await testImage() });
    await unit(0).locator(SEL.unitPreprocessor).selectOption('canny');
    await waitHint(0);
    await setSize(QUICK.side, QUICK.steps);
    await page.click(SEL.generate);
    await page.locator(SEL.results).first().waitFor({ timeout: 60000 });
  });
  await step('after a reload the key is still there and nothing is asked', async () => {
    await page.reload();
    await page.waitForSelector(SEL.ready);
    check((await page.inputValue(SEL.apiKey)) === key, 'the key was not kept');
    check(!/needs an API key/.test(await page.textContent(SEL.message)), 'still asks for the key');
  });
  await context.close();
}

async function phone(browser) {
  const context = await browser.newContext({
    viewport: { width: 390, height: 844 },
    deviceScaleFactor: 2,
    isMobile: true,
    hasTouch: true,
  });
  page = await context.newPage();
  watch(page);
  await step('phone-size viewport: one column, nothing wider than the screen', async () => {
    await page.goto(`${base}/`);
    await page.waitForSelector(SEL.ready);
    const layout = await page.evaluate(() => {
      const [form, results] = [document.querySelector('#gen-form'), document.querySelector('.results')];
      return {
        overflow: document.documentElement.scrollWidth - window.innerWidth,
        stacked: results.getBoundingClientRect().top >= form.getBoundingClientRect().bottom,
      };
    });
    check(layout.overflow <= 0, `the page is ${layout.overflow}px wider than the phone`);
    check(layout.stacked, 'form and results are not in one column');
    await shot(page, 'phone');
  });
  await context.close();
}

const guard = setTimeout(() => {
  console.error(`FAIL: the test took over 4 minutes (step: ${stepName})`);
  process.exit(1);
}, 240000);

try {
  await main();
  clearTimeout(guard);
  log('PASS: browser test');
} catch (e) {
  console.error(`FAIL at "${stepName}": ${e.message}`);
  process.exit(1);
}
