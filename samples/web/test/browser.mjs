// Drive the web demo in headless Chromium as a phone would, for tests/test_web.py:
//
//   node browser.mjs CHROMIUM URL SCREENSHOT_DIR ASKS_JSON
//
// ASKS_JSON: [{"image": "/samples/000-color.png", "question": "..."}, {"file": "/path/photo.png", "question": ...}].
// A phone viewport with touch; for each ask: tap the sample picture (or hand the photo picker a file), type the
// question, tap Ask, wait for the answer, take a screenshot. Prints one JSON
// object: the page's results (window.pocketvlm.last per ask), the screenshots, and every request that tried to
// leave loopback (blocked, and a failure for the test) or failed.
import path from 'node:path';

import { chromium } from 'playwright-core';

const [executablePath, url, shotDir, asksJson] = process.argv.slice(2);
if (!executablePath || !url || !shotDir || !asksJson) {
    console.error('usage: node browser.mjs CHROMIUM URL SCREENSHOT_DIR ASKS_JSON');
    process.exit(2);
}
const asks = JSON.parse(asksJson);
const TIMEOUT = Number(process.env.POCKETVLM_BROWSER_TIMEOUT_MS ?? 240000);

const browser = await chromium.launch({
    executablePath,
    headless: true,
    args: [
        '--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
        '--disable-sync', '--no-first-run',
    ],
});
const report = { results: [], screenshots: [], blocked: [], failed: [], console: [], errors: [] };
try {
    const context = await browser.newContext({
        viewport: { width: 390, height: 844 }, // a 6.1" phone
        deviceScaleFactor: 3,
        isMobile: true,
        hasTouch: true,
        userAgent: 'Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) ' +
            'Chrome/150.0.0.0 Mobile Safari/537.36',
    });
    const loopback = (u) => ['127.0.0.1', 'localhost', '[::1]'].includes(new URL(u).hostname);
    await context.route('**/*', (route) => {
        const target = route.request().url();
        if (/^(data|blob):/.test(target) || loopback(target)) return route.continue();
        report.blocked.push(target);
        return route.abort('blockedbyclient');
    });
    const page = await context.newPage();
    page.setDefaultTimeout(TIMEOUT);
    page.on('console', (m) => report.console.push(`${m.type()}: ${m.text()}`));
    page.on('pageerror', (e) => report.errors.push(String(e)));
    page.on('requestfailed', (r) => report.failed.push(`${r.url()} ${r.failure()?.errorText}`));

    const started = Date.now();
    await page.goto(url);
    await page.waitForSelector('body[data-state="ready"], body[data-state="error"]');
    report.load_ms = Date.now() - started;
    if ((await page.getAttribute('body', 'data-state')) === 'error') throw new Error(await page.textContent('#status'));

    for (const [i, ask] of asks.entries()) {
        if (ask.file) {
            // the photo picker (on a phone: the camera or the gallery) handing over a file
            const before = await page.getAttribute('#preview', 'src');
            await page.setInputFiles('#file', ask.file);
            await page.waitForFunction(
                (old) => (document.getElementById('preview').getAttribute('src') ?? old) !== old, before ?? '');
        } else {
            await page.locator(`#samples button[data-image="${ask.image}"]`).tap();
            await page.waitForFunction(
                (src) => document.getElementById('preview').getAttribute('src') === src, ask.image);
        }
        await page.locator('#question').tap();
        await page.locator('#question').fill('');
        await page.keyboard.type(ask.question);
        await page.locator('#go:not([disabled])').tap();
        await page.waitForSelector('body[data-state="done"], body[data-state="error"]');
        if ((await page.getAttribute('body', 'data-state')) === 'error') {
            throw new Error(await page.textContent('#status'));
        }
        const result = await page.evaluate(() => window.pocketvlm.last);
        result.shown = (await page.textContent('#answer')).trim();
        result.stats = await page.textContent('#stats');
        report.results.push(result);
        const shot = path.join(shotDir, `web-demo-${i + 1}.png`);
        await page.screenshot({ path: shot, fullPage: true });
        report.screenshots.push(shot);
    }
} catch (error) {
    report.errors.push(String(error?.stack ?? error));
} finally {
    await browser.close();
}
console.log(JSON.stringify(report));
