// Opens vmlet's noVNC console page in Debian's chromium (headless, driven
// by playwright-core), waits until noVNC reports connected and the guest's
// text shows on its canvas, and saves a screenshot.
//
//   node console.mjs PAGE_URL SCREENSHOT_PATH
//
// PAGE_URL is the daemon's /console?token=T. Prints one JSON line on stdout:
//
//   {"state":"connected","canvas":{"width":720,"height":400},"text_pixels":N,
//    "region":{"x":0,"y":0,"width":W,"height":H},"background":[r,g,b],...}
//
// text_pixels counts the pixels of the canvas's top-left region (where a
// text console draws its first lines) whose colour is neither black nor the
// colour at (0,0) (the background). On failure the line also has "error",
// the message goes to stderr, and the exit status is 1 (2 for bad usage).
// A screenshot is taken whenever the page got that far, failure or not.
//
// Environment: CHROMIUM (default /usr/bin/chromium), MIN_TEXT_PIXELS
// (default 200), CONNECT_TIMEOUT_MS (default 30000), TEXT_TIMEOUT_MS
// (default 60000). Every file it makes (chromium's profile included) is
// under a fresh directory in $TMPDIR (or /tmp), removed at exit; chromium
// is closed, or killed, at exit and on SIGTERM, SIGINT or SIGHUP.
// Installed by scripts/setup.sh --test (npm ci here; never downloads a
// browser of its own).

import { mkdtempSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const MIN_TEXT_PIXELS = Number(process.env.MIN_TEXT_PIXELS || 200);
const CONNECT_TIMEOUT_MS = Number(process.env.CONNECT_TIMEOUT_MS || 30000);
const TEXT_TIMEOUT_MS = Number(process.env.TEXT_TIMEOUT_MS || 60000);
// Without the background-networking flags chromium keeps trying to reach
// Google's hosts, which a closed network refuses.
const CHROMIUM_ARGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];
// The region checked for text: the top-left of the guest's screen. A VGA
// text console is 720x400 (80x25 cells of 9x16); half of each side holds
// the start of the first twelve lines.
const REGION = { x: 0, y: 0, width: 360, height: 200 };

const [pageUrl, screenshotPath] = process.argv.slice(2);
if (!pageUrl || !screenshotPath) {
  console.error('usage: node console.mjs PAGE_URL SCREENSHOT_PATH');
  process.exit(2);
}

// All temp files (playwright's and chromium's profile) go under `scratch`.
const scratch = mkdtempSync(join(tmpdir(), 'vmlet-console-browser-'));
process.env.TMPDIR = scratch;

let browser = null;
const result = { state: null, canvas: null, text_pixels: 0, region: REGION };
const pageLog = [];

// SIGKILLs every process whose command line names `scratch`: chromium and
// its helpers (they all get the profile directory in there). playwright's
// Browser does not expose the process, and a hung one must still go.
function killBrowser() {
  let pids;
  try { pids = readdirSync('/proc').filter((p) => /^[0-9]+$/.test(p)); } catch { return; }
  for (const pid of pids) {
    if (Number(pid) === process.pid) continue;
    let cmdline;
    try { cmdline = readFileSync(`/proc/${pid}/cmdline`, 'latin1'); } catch { continue; }
    if (cmdline.includes(scratch)) {
      try { process.kill(Number(pid), 'SIGKILL'); } catch { /* gone already */ }
    }
  }
}

function removeScratch() {
  try { rmSync(scratch, { recursive: true, force: true }); } catch { /* best effort */ }
}

async function cleanup() {
  if (browser) {
    // A graceful close, bounded: then the hard way.
    await Promise.race([
      browser.close().catch(() => {}),
      new Promise((resolve) => setTimeout(resolve, 5000)),
    ]);
    killBrowser();
    browser = null;
  }
  removeScratch();
}

for (const signal of ['SIGTERM', 'SIGINT', 'SIGHUP']) {
  process.on(signal, () => {
    killBrowser();
    removeScratch();
    console.error(`console.mjs: ${signal}: browser killed`);
    process.exit(128 + ({ SIGHUP: 1, SIGINT: 2, SIGTERM: 15 })[signal]);
  });
}
process.on('exit', () => {
  killBrowser();
  removeScratch();
});

// Runs in the page: the canvas's size and its text pixels in `region`.
function measure(region) {
  const canvas = document.querySelector('#screen canvas');
  const out = {
    state: document.body.dataset.state || null,
    status: document.getElementById('status')?.textContent || '',
    canvas: canvas ? { width: canvas.width, height: canvas.height } : null,
    text_pixels: 0,
    background: null,
  };
  if (!canvas || !canvas.width || !canvas.height) return out;
  const w = Math.min(region.width, canvas.width - region.x);
  const h = Math.min(region.height, canvas.height - region.y);
  if (w <= 0 || h <= 0) return out;
  const ctx = canvas.getContext('2d');
  const bg = ctx.getImageData(0, 0, 1, 1).data;
  out.background = [bg[0], bg[1], bg[2]];
  const data = ctx.getImageData(region.x, region.y, w, h).data;
  let n = 0;
  for (let i = 0; i < data.length; i += 4) {
    const r = data[i], g = data[i + 1], b = data[i + 2];
    const black = r === 0 && g === 0 && b === 0;
    const background = r === bg[0] && g === bg[1] && b === bg[2];
    if (!black && !background) n++;
  }
  out.text_pixels = n;
  return out;
}

async function run() {
  const started = Date.now();
  const { chromium } = await import('playwright-core');
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: CHROMIUM_ARGS,
    // Ours (above) kill chromium's whole process group.
    handleSIGINT: false,
    handleSIGTERM: false,
    handleSIGHUP: false,
    timeout: 30000,
  });
  const page = await browser.newPage({ viewport: { width: 1024, height: 800 } });
  page.on('console', (m) => pageLog.push(`console.${m.type()}: ${m.text()}`));
  page.on('pageerror', (e) => pageLog.push(`pageerror: ${e.message}`));
  page.on('requestfailed', (r) => pageLog.push(`requestfailed: ${r.url()} ${r.failure()?.errorText}`));
  page.on('response', (r) => {
    if (r.status() >= 400) pageLog.push(`HTTP ${r.status()}: ${r.url()}`);
  });

  try {
    const response = await page.goto(pageUrl, { waitUntil: 'load', timeout: 30000 });
    if (!response || !response.ok()) {
      throw new Error(`GET ${pageUrl}: HTTP ${response ? response.status() : 'no response'}`);
    }
    // Connected, or given up: the page's own state says which.
    try {
      await page.waitForFunction(
        () => ['connected', 'disconnected'].includes(document.body.dataset.state),
        null, { timeout: CONNECT_TIMEOUT_MS, polling: 100 });
    } catch {
      const now = await page.evaluate(measure, REGION).catch(() => null);
      if (now) Object.assign(result, now);
      const hint = now?.state === 'loading'
        ? ": the page's script never ran (blocked by its Content-Security-Policy? see the page log)"
        : '';
      throw new Error(`noVNC did not report connected within ${CONNECT_TIMEOUT_MS} ms ` +
        `(page state ${now?.state}, status ${JSON.stringify(now?.status)})${hint}`);
    }
    result.connect_ms = Date.now() - started;
    let m = await page.evaluate(measure, REGION);
    Object.assign(result, m);
    if (m.state !== 'connected') throw new Error(`the page says: ${m.status}`);

    // The guest draws asynchronously: poll until enough text shows.
    const deadline = Date.now() + TEXT_TIMEOUT_MS;
    while (m.text_pixels < MIN_TEXT_PIXELS) {
      if (m.state !== 'connected') throw new Error(`the page says: ${m.status}`);
      if (Date.now() > deadline) {
        throw new Error(`only ${m.text_pixels} text pixels (want ${MIN_TEXT_PIXELS}) ` +
          `in the canvas's top-left ${REGION.width}x${REGION.height} after ${TEXT_TIMEOUT_MS} ms`);
      }
      await page.waitForTimeout(250);
      m = await page.evaluate(measure, REGION);
      Object.assign(result, m);
    }
    result.text_ms = Date.now() - started;
  } finally {
    try {
      await page.screenshot({ path: screenshotPath, timeout: 10000 });
      result.screenshot = screenshotPath;
    } catch (e) {
      pageLog.push(`screenshot failed: ${e.message}`);
    }
  }
}

let status = 0;
try {
  await run();
} catch (e) {
  result.error = e.message.split('\n')[0];
  status = 1;
  console.error(`console.mjs: ${e.message}`);
  if (pageLog.length) console.error(`page log:\n  ${pageLog.slice(-30).join('\n  ')}`);
} finally {
  await cleanup();
}
result.region = REGION;
process.stdout.write(`${JSON.stringify(result)}\n`);
process.exit(status);
