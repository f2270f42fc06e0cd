// Test-only network guard for Node, the counterpart of tests/netguard/sitecustomize.py: preloaded with
// `node --import ./netguard.mjs`, it refuses any connection or name lookup beyond loopback and appends it to the
// file named by POCKETVLM_NETGUARD_LOG, so the pytest test that ran the script fails even if the error was swallowed.
import dns from 'node:dns';
import fs from 'node:fs';
import net from 'node:net';

const LOOPBACK_NAMES = new Set(['', 'localhost', 'localhost.localdomain', 'ip6-localhost']);

function isLoopback(host) {
    if (host === undefined || host === null) return true;
    const h = String(host).replace(/^\[|\]$/g, '').toLowerCase();
    if (LOOPBACK_NAMES.has(h)) return true;
    if (net.isIPv4(h)) return h.startsWith('127.');
    if (net.isIPv6(h)) return h === '::1' || h.startsWith('::ffff:127.');
    return false;
}

function refuse(what, target) {
    const log = process.env.POCKETVLM_NETGUARD_LOG;
    if (log) fs.appendFileSync(log, `${process.pid} node ${what} ${JSON.stringify(String(target))}\n`);
    throw new Error(`test network guard: ${what} to ${target} refused (only loopback is allowed)`);
}

const realConnect = net.Socket.prototype.connect;
net.Socket.prototype.connect = function (...args) {
    let options = args[0];
    if (Array.isArray(options)) options = options[0]; // the internal normalized form
    if (options && typeof options === 'object') {
        if (!options.path && !isLoopback(options.host ?? 'localhost')) refuse('connect', options.host);
    } else if (typeof options === 'number' || /^\d+$/.test(String(options))) {
        const host = typeof args[1] === 'string' ? args[1] : 'localhost';
        if (!isLoopback(host)) refuse('connect', host);
    }
    return realConnect.apply(this, args);
};

const realLookup = dns.lookup;
dns.lookup = function (host, ...rest) {
    if (!isLoopback(host)) refuse('name lookup', host);
    return realLookup.call(this, host, ...rest);
};
const realPromiseLookup = dns.promises.lookup;
dns.promises.lookup = function (host, ...rest) {
    if (!isLoopback(host)) refuse('name lookup', host);
    return realPromiseLookup.call(this, host, ...rest);
};

const realFetch = globalThis.fetch;
if (realFetch) {
    globalThis.fetch = function (resource, ...rest) {
        const url = new URL(typeof resource === 'string' ? resource : resource.url ?? String(resource));
        if (url.protocol !== 'file:' && url.protocol !== 'data:' && !isLoopback(url.hostname)) {
            refuse('fetch', url.href);
        }
        return realFetch.call(this, resource, ...rest);
    };
}
