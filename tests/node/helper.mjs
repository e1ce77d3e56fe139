// The package's chat.completions.stream() helper: events, then the accumulated final completion.
import OpenAI from "openai";

const client = new OpenAI({ baseURL: process.env.BASE_URL + "/v1", apiKey: process.env.API_KEY ?? "-" });

const deltas = [];
const runner = client.chat.completions.stream({
  model: "tgi",
  messages: [{ role: "user", content: "Explain the TGI OpenAI-compatible API." }],
  max_tokens: Number(process.env.MAX_TOKENS ?? 120),
  temperature: 0,
  n: 2,
  stream_options: { include_usage: true },
});
runner.on("content", (delta) => deltas.push(delta));
const completion = await runner.finalChatCompletion();
console.log(JSON.stringify({ deltas, completion }));
