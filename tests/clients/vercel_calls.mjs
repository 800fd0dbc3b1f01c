// Drive the Vercel AI SDK (`ai` + `@ai-sdk/openai`) against the relay: argv base_url, key.
// Prints one JSON line: {scenario: {"ok": result}} or {"failed": {"error", "message"}}.
// Run by tests/test_clients_agents.py. The fake upstream calls a tool only when one is forced,
// so the loops force the first step's tool and let the next answer; the tools are strict (the
// chat provider sends none strict by default) so the fake's arguments fit their schemas.
import { createOpenAI } from '@ai-sdk/openai';
import * as ai from 'ai';
import { z } from 'zod';

const { embed, embedMany, generateObject, generateText, stepCountIs, streamObject, streamText, tool } = ai;
const generateImage = ai.generateImage ?? ai.experimental_generateImage;
const [base, key] = process.argv.slice(2);
const sent = [];
const openai = createOpenAI({
  apiKey: key, baseURL: base,
  fetch: async (url, init) => { sent.push(JSON.parse(init.body ?? 'null')); return fetch(url, init); },
});
const weather = tool({ description: 'Return the weather of a city', inputSchema: z.object({ city: z.string() }), strict: true,
  execute: async ({ city }) => `${city} is sunny` });
const time = tool({ description: 'Return the time in a zone', inputSchema: z.object({ tz: z.string() }), strict: true,
  execute: async ({ tz }) => `12:00 in ${tz}` });
const firstForced = ({ stepNumber }) => ({ toolChoice: stepNumber === 0 ? 'required' : 'auto' });
const out = {};

async function provider(label, model) {
  out[label + '_text'] = (await generateText({ model, prompt: 'hello relay', maxRetries: 0 })).text;
  const s = streamText({ model, prompt: 'stream it', maxRetries: 0 });
  let text = '';
  for await (const d of s.textStream) text += d;
  out[label + '_stream'] = [text, await s.finishReason, (await s.usage).outputTokens > 0];
  const loop = await generateText({ model, prompt: 'Oslo', tools: { weather }, stopWhen: stepCountIs(4),
    prepareStep: firstForced, maxRetries: 0 });
  out[label + '_loop'] = [loop.steps.map(x => x.finishReason), loop.steps[0].toolResults.map(x => x.output), loop.text];
  const sl = streamText({ model, prompt: 'Rome [[fake:parallel]]', tools: { weather, time },
    stopWhen: stepCountIs(4), prepareStep: firstForced, maxRetries: 0 });
  const errors = [];
  for await (const p of sl.fullStream) if (p.type === 'error' || p.type === 'tool-error') errors.push(String(p.error));
  const steps = await sl.steps;
  out[label + '_stream_loop'] = [steps.length, steps[0].toolResults.map(x => x.output).sort(), errors];
  const again = await generateText({ model, tools: { weather }, maxRetries: 0,
    messages: [{ role: 'user', content: 'Oslo' }, ...loop.response.messages, { role: 'user', content: 'thanks' }] });
  out[label + '_multi_turn'] = again.text;
  const schema = z.object({ name: z.string(), age: z.number(), tags: z.array(z.string()) });
  out[label + '_object'] = (await generateObject({ model, schema, prompt: 'a person', maxRetries: 0 })).object;
  const so = streamObject({ model, schema, prompt: 'streamed person', maxRetries: 0 });
  for await (const _ of so.partialObjectStream) { /* drain */ }
  out[label + '_stream_object'] = await so.object;
}

try {
  await provider('responses', openai('gpt-4o-mini'));
  const refs = sent.flatMap(b => (Array.isArray(b?.input) ? b.input : [])).filter(i => i.type === 'item_reference');
  out.item_references = refs.length;
  await provider('chat', openai.chat('gpt-4o-mini'));
  out.embed = (await embed({ model: openai.embedding('text-embedding-3-small'), value: 'hi', maxRetries: 0 })).embedding.length;
  out.embed_many = (await embedMany({ model: openai.embedding('text-embedding-3-small'), values: ['a', 'b', 'c'], maxRetries: 0 }))
    .embeddings.map(e => e.length);
  const img = await generateImage({ model: openai.image('dall-e-2'), prompt: 'a cat', size: '256x256', n: 2, maxRetries: 0 });
  out.image = [img.images.length, img.images[0].mediaType];
  console.log(JSON.stringify(Object.fromEntries(Object.entries(out).map(([k, v]) => [k, { ok: v }]))));
} catch (e) {
  console.log(JSON.stringify({ failed: { error: e?.constructor?.name, message: String(e?.message).slice(0, 1000) } }));
}
