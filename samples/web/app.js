// pocketvlm web demo: ask a SmolVLM2 ONNX export about a photo, in the browser.
//
// transformers.js (its self-contained bundle, served from node_modules by `pocketvlm serve-web`) does what it does in
// Node (tests/js): the processor (chat template, image splitting, <image> expansion), the three ONNX sessions on
// onnxruntime-web, greedy generate(). Every file comes from the page's own server: remote models are off and the
// WebAssembly runtime is loaded from /vendor/ort/, never from a CDN.
//
// ?device=wasm or ?device=webgpu forces a backend; by default WebGPU is used when the browser offers an adapter.
// State for tests and curious users: document.body.dataset.state (loading, ready, busy, done, error) and
// window.pocketvlm.last (answer, prompt and generated token ids, timings).
import { AutoModelForVision2Seq, AutoProcessor, RawImage, TextStreamer, env } from '/vendor/transformers.min.js';

env.allowRemoteModels = false;
env.allowLocalModels = true;
env.localModelPath = '/models/';
env.useBrowserCache = false; // the server marks model files immutable (their URL changes with the export)
env.backends.onnx.wasm.wasmPaths = '/vendor/ort/';

const MAX_NEW_TOKENS = 64;
const $ = (id) => document.getElementById(id);
const state = { processor: null, model: null, device: null, image: null, busy: false, last: null };
window.pocketvlm = state;

function setState(name, status) {
    document.body.dataset.state = name;
    if (status !== undefined) $('status').textContent = status;
    $('go').disabled = !(state.model && state.image && !state.busy && $('question').value.trim());
}

async function webgpuAvailable() {
    try {
        return Boolean(navigator.gpu && (await navigator.gpu.requestAdapter()));
    } catch {
        return false;
    }
}

// ------------------------------------------------------------------------------------------------------ loading

async function load() {
    const demo = await (await fetch('/demo.json')).json();
    $('model').textContent = `${demo.name} · ${demo.quant} · ${demo.source ?? 'SmolVLM2'}`;
    showSamples(demo.samples);

    const files = new Map(); // file -> [loaded, total], for one progress bar over all of them
    const progress_callback = (p) => {
        if (p.status !== 'progress' || !p.total) return;
        files.set(p.file, [p.loaded, p.total]);
        const [loaded, total] = [...files.values()].reduce((a, b) => [a[0] + b[0], a[1] + b[1]], [0, 0]);
        $('progress').value = (100 * loaded) / total;
        $('status').textContent = `Loading the model… ${(loaded / 2 ** 20).toFixed(1)} / ${(total / 2 ** 20).toFixed(1)} MB`;
    };
    const forced = new URLSearchParams(location.search).get('device');
    const devices = forced ? [forced] : (await webgpuAvailable()) ? ['webgpu', 'wasm'] : ['wasm'];
    const started = performance.now();
    state.processor = await AutoProcessor.from_pretrained(demo.model, { progress_callback });
    for (const device of devices) {
        try {
            // the dtype (fp32, fp16, int8, q4) comes from config.json's transformers.js_config, as pocketvlm wrote it
            state.model = await AutoModelForVision2Seq.from_pretrained(demo.model, { device, progress_callback });
            state.device = device;
            break;
        } catch (error) {
            if (device === devices.at(-1)) throw error;
            console.warn(`${device} failed, trying the next backend:`, error);
        }
    }
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    $('model').textContent += ` · ${state.device}`;
    setState('ready', `Model ready on ${state.device} (${seconds} s). Pick a photo and ask.`);
}

// ------------------------------------------------------------------------------------------------ picture, question

function showSamples(samples) {
    const strip = $('samples');
    for (const sample of samples) {
        const button = document.createElement('button');
        button.type = 'button';
        button.dataset.image = sample.image;
        button.setAttribute('aria-pressed', 'false');
        button.setAttribute('aria-label', `sample picture ${sample.image.split('/').pop()}`);
        button.innerHTML = `<img src="${sample.image}" alt="">`;
        button.addEventListener('click', () => {
            for (const b of strip.children) b.setAttribute('aria-pressed', String(b === button));
            useImage(sample.image, sample.question);
        });
        strip.append(button);
    }
    const questions = [...new Set(samples.map((s) => s.question))].slice(0, 6);
    for (const question of questions) {
        const chip = document.createElement('button');
        chip.type = 'button';
        chip.textContent = question;
        chip.addEventListener('click', () => {
            $('question').value = question;
            setState(document.body.dataset.state);
        });
        $('suggestions').append(chip);
    }
}

async function useImage(url, question) {
    state.image = await RawImage.fromURL(url);
    $('preview').src = url;
    $('preview').hidden = false;
    if (question && !$('question').value.trim()) $('question').value = question;
    $('answer').textContent = '';
    $('stats').textContent = '';
    setState(document.body.dataset.state === 'loading' ? 'loading' : 'ready');
}

$('file').addEventListener('change', async (event) => {
    const file = event.target.files?.[0];
    if (!file) return;
    for (const b of $('samples').children) b.setAttribute('aria-pressed', 'false');
    const url = URL.createObjectURL(file);
    try {
        await useImage(url);
    } catch (error) {
        setState('error', `Could not read that picture: ${error.message ?? error}`);
    }
});

$('question').addEventListener('input', () => setState(document.body.dataset.state));
$('question').addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && !$('go').disabled) ask();
});
$('go').addEventListener('click', () => ask());

// ------------------------------------------------------------------------------------------------------ answering

async function ask() {
    const question = $('question').value.trim();
    if (!question || !state.image || !state.model || state.busy) return;
    state.busy = true;
    setState('busy', 'Thinking…');
    $('answer').textContent = '';
    $('stats').textContent = '';
    try {
        const { processor, model } = state;
        const messages = [{ role: 'user', content: [{ type: 'image' }, { type: 'text', text: question }] }];
        const prompt = processor.apply_chat_template(messages, { add_generation_prompt: true });
        const started = performance.now();
        const inputs = await processor(prompt, [state.image]);
        const stamps = []; // when each generated token arrived
        const streamer = new TextStreamer(processor.tokenizer, {
            skip_prompt: true,
            skip_special_tokens: true,
            callback_function: (text) => ($('answer').textContent += text),
            token_callback_function: () => {
                stamps.push(performance.now());
                showStats(started, stamps);
            },
        });
        const sequences = await model.generate({ ...inputs, max_new_tokens: MAX_NEW_TOKENS, do_sample: false, streamer });

        const promptIds = inputs.input_ids.tolist()[0].map(Number);
        const generated = sequences.tolist()[0].map(Number).slice(promptIds.length);
        // the answer as pocketvlm's Python backends give it: end-of-sequence dropped, special tokens skipped, trimmed
        const eos = [model.generation_config.eos_token_id].flat().map(Number);
        const answerIds = generated.length && eos.includes(generated.at(-1)) ? generated.slice(0, -1) : generated;
        const answer = processor.tokenizer.decode(answerIds, { skip_special_tokens: true }).trim();
        $('answer').textContent = answer;
        const timings = showStats(started, stamps);
        state.last = {
            question,
            answer,
            prompt_ids: promptIds,
            generated_ids: generated,
            pixel_values_shape: inputs.pixel_values.dims,
            pixel_values_sha256: await sha256(inputs.pixel_values.data),
            device: state.device,
            ...timings,
        };
        setState('done', `Answered on ${state.device}.`);
    } catch (error) {
        console.error(error);
        setState('error', `Something went wrong: ${error.message ?? error}`);
    } finally {
        state.busy = false;
        setState(document.body.dataset.state);
    }
}

// A fingerprint of the pixels the model saw, to compare with pocketvlm's Python preprocessing (secure contexts only:
// crypto.subtle is not offered to plain-http LAN pages).
async function sha256(floats) {
    if (!globalThis.crypto?.subtle) return null;
    const digest = await crypto.subtle.digest('SHA-256', new Float32Array(floats).buffer);
    return [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, '0')).join('');
}

function showStats(started, stamps) {
    const ttft_ms = stamps.length ? stamps[0] - started : null;
    const decode_tok_s =
        stamps.length > 1 ? ((stamps.length - 1) * 1000) / (stamps.at(-1) - stamps[0]) : null;
    const parts = [`${state.device}`];
    if (ttft_ms !== null) parts.push(`first token ${ttft_ms.toFixed(0)} ms`);
    if (decode_tok_s !== null) parts.push(`${decode_tok_s.toFixed(1)} tokens/s`);
    parts.push(`${stamps.length} tokens`);
    $('stats').textContent = parts.join(' · ');
    return { ttft_ms, decode_tok_s, tokens: stamps.length };
}

function explain(error) {
    const text = String(error?.message ?? error);
    if (text.includes('GatherBlockQuantized')) {
        // a q4 export from an older pocketvlm, with a 4-bit embedding table: onnxruntime-web has that kernel for
        // WebGPU only (current q4 exports keep the table 8-bit and run on WebAssembly)
        return `this q4 export needs WebGPU (the WebAssembly runtime cannot run its 4-bit embedding table); ` +
            `re-quantize it with a current pocketvlm, or open the page where WebGPU is available. (${text})`;
    }
    return text;
}

load().catch((error) => {
    console.error(error);
    setState('error', `Could not load the model: ${explain(error)}`);
});
