// Load a pocketvlm ONNX export in transformers.js (Node, local files only) as a SmolVLM model, answer one question
// about one image greedily, and print the prompt and generated token ids as JSON on stdout.
//
//   node generate.mjs ARTIFACT_DIR IMAGE QUESTION [MAX_NEW_TOKENS]
//
// Everything is transformers.js's own: AutoProcessor (chat template, image splitting, token expansion),
// AutoModelForVision2Seq (the three ONNX sessions, the dtype named in config.json's transformers.js_config) and
// generate(). Nothing is fetched: remote models are off and the artifact is a local folder.
import path from 'node:path';

import { AutoModelForVision2Seq, AutoProcessor, RawImage, env } from '@huggingface/transformers';

env.allowRemoteModels = false;
env.allowLocalModels = true;
env.useFSCache = false;

const [dir, imagePath, question, maxTokens = '16'] = process.argv.slice(2);
if (!dir || !imagePath || !question) {
    console.error('usage: node generate.mjs ARTIFACT_DIR IMAGE QUESTION [MAX_NEW_TOKENS]');
    process.exit(2);
}
const modelDir = path.resolve(dir);
const options = { local_files_only: true };

const processor = await AutoProcessor.from_pretrained(modelDir, options);
const model = await AutoModelForVision2Seq.from_pretrained(modelDir, { ...options, device: 'cpu' });

const messages = [{ role: 'user', content: [{ type: 'image' }, { type: 'text', text: question }] }];
const prompt = processor.apply_chat_template(messages, { add_generation_prompt: true });
const image = await RawImage.read(path.resolve(imagePath));
const inputs = await processor(prompt, [image]);

const sequences = await model.generate({ ...inputs, max_new_tokens: Number(maxTokens), do_sample: false });
const promptIds = inputs.input_ids.tolist()[0].map(Number);
const allIds = sequences.tolist()[0].map(Number);

console.log(JSON.stringify({
    prompt_ids: promptIds,
    generated_ids: allIds.slice(promptIds.length),
    pixel_values_shape: inputs.pixel_values.dims,
    dtype: model.config['transformers.js_config']?.dtype ?? null,
}));
