// The official `openai` Node SDK against the relay, the way its users call it; prints one JSON
// object of outcomes. Run by tests/test_clients_node.py: `node openai_calls.mjs BASE KEY BROKE`.
// Each outcome is {ok: value} or {error: class name, status, requestID}.
import OpenAI from "openai";

const [base, key, broke] = process.argv.slice(2);
const client = (apiKey, baseURL = base) => new OpenAI({ apiKey, baseURL, maxRetries: 0, timeout: 20000 });
const c = client(key);
const hi = [{ role: "user", content: "hello relay" }];
const tools = [{ type: "function", function: { name: "get_weather",
  parameters: { type: "object", properties: { city: { type: "string" } } } } }];
const out = {};
let deleted = "resp_never_made";

async function run(name, call) {
  try {
    out[name] = { ok: await call() };
  } catch (e) {
    out[name] = { error: e.constructor.name, status: e.status ?? null, requestID: e.requestID ?? null };
  }
}

await run("chat", async () => (await c.chat.completions.create({ model: "gpt-3.5", messages: hi })).choices[0].message.content);
await run("chat_stream", async () => {
  let text = "", usage = null;
  for await (const ch of await c.chat.completions.create({ model: "gpt-4o", messages: hi, stream: true,
    stream_options: { include_usage: true } })) {
    text += ch.choices[0]?.delta?.content ?? "";
    usage = ch.usage ?? usage;
  }
  return { text, completion_tokens: usage?.completion_tokens ?? null };
});
await run("chat_stream_nulls", async () => {  // OpenAI's include_usage: null on all but the last
  const chunks = [];
  for await (const ch of await c.chat.completions.create({ model: "gpt-4o", stream: true,
    messages: [{ role: "user", content: "hi [[fake:nousage]]" }], stream_options: { include_usage: true } })) chunks.push(ch);
  return [chunks.slice(0, -1).every((ch) => ch.usage === null), chunks.at(-1).usage?.completion_tokens > 0];
});
await run("chat_stream_helper", async () =>
  (await c.chat.completions.stream({ model: "gpt-4o", messages: hi, tools, tool_choice: "required" })
    .finalChatCompletion()).choices[0].message.tool_calls.map((t) => t.function.name));
await run("chat_strict_tool", async () => {  // a strict tool is called with its parameters' shape
  const strict = [{ type: "function", function: { name: "lookup", strict: true, parameters: { type: "object",
    properties: { city: { type: "string" }, days: { type: "integer" } }, required: ["city", "days"],
    additionalProperties: false } } }];
  const done = await c.chat.completions.parse({ model: "gpt-4o", messages: hi, tools: strict, tool_choice: "required" });
  return done.choices[0].message.tool_calls[0].function.parsed_arguments;
});
await run("chat_params", async () => (await c.chat.completions.create({ model: "gpt-4o", messages: hi, n: 2,
  logprobs: true, top_logprobs: 2, seed: 3, stop: ["END"], user: "u-2", metadata: { a: "b" }, store: true,
  max_completion_tokens: 30, parallel_tool_calls: true, tools,
  response_format: { type: "json_schema", json_schema: { name: "x", schema: { type: "object" } } } })).choices.length);
await run("completion", async () => (await c.completions.create({ model: "gpt-3.5-turbo-instruct",
  prompt: "Say this", echo: true, logprobs: 1, suffix: "end", best_of: 2, max_tokens: 4 })).choices[0].text);
await run("embeddings_default", async () => {  // the SDK asks for base64 and decodes it itself
  const e = await c.embeddings.create({ model: "text-embedding-3-small", input: ["a", "b"] });
  return [e.data.length, e.data[0].embedding.length, typeof e.data[0].embedding[0]];
});
await run("embeddings_tokens_dims", async () => (await c.embeddings.create({ model: "text-embedding-3-small",
  input: [[1, 2], [3]], encoding_format: "float", dimensions: 8 })).data.map((d) => d.embedding.length));
await run("images", async () => (await c.images.generate({ prompt: "a cat", n: 2, size: "256x256",
  response_format: "b64_json" })).data.map((d) => d.b64_json.length > 0));
await run("models", async () => {
  const ids = [];
  for await (const m of c.models.list()) ids.push(m.id);
  return { ids, one: (await c.models.retrieve("gpt-4o")).id };
});
await run("responses", async () => {
  const fnTools = [{ type: "function", name: "get_weather", parameters: { type: "object", properties: {} }, strict: false }];
  const first = await c.responses.create({ model: "gpt-4o", input: [{ role: "user", content: "weather?" }],
    instructions: "brief", tools: fnTools, tool_choice: "required" });
  const call = first.output.find((o) => o.type === "function_call");
  const second = await c.responses.create({ model: "gpt-4o", previous_response_id: first.id, tools: fnTools,
    input: [{ type: "function_call_output", call_id: call.call_id, output: "sunny" }] });
  const stream = c.responses.stream({ model: "gpt-4o", input: "stream it", previous_response_id: second.id });
  const events = [];
  for await (const e of stream) events.push(e.type);
  const final = await stream.finalResponse();
  const got = (await c.responses.retrieve(second.id)).status;
  const items = (await c.responses.inputItems.list(second.id)).data.map((i) => i.type);
  await c.responses.delete(second.id);
  deleted = second.id;
  const unstored = await c.responses.create({ model: "gpt-4o", input: "x", store: false });
  return { call: call.name, text: second.output_text, first: events[0], last: events.at(-1),
    final: final.output_text, got, items, unstored: unstored.store };
});
await run("retrieve_deleted", async () => c.responses.retrieve(deleted));
await run("request_id", async () => (await c.chat.completions.create({ model: "gpt-3.5", messages: hi })
  .withResponse()).response.headers.get("x-request-id"));
await run("legacy_prefix", async () => (await client(key, base.replace(/\/v1$/, "/index.php/api/v1"))
  .chat.completions.create({ model: "gpt-3.5", messages: hi })).object);
await run("bad_key", async () => client("sk-not-a-real-key").chat.completions.create({ model: "gpt-3.5", messages: hi }));
await run("empty_wallet", async () => client(broke).chat.completions.create({ model: "gpt-3.5", messages: hi }));
await run("unknown_model", async () => c.models.retrieve("gpt-99"));
await run("no_messages", async () => c.chat.completions.create({ model: "gpt-3.5", messages: [] }));
console.log(JSON.stringify(out));
