// Errors arrive as the package's error classes.
import OpenAI from "openai";

const client = new OpenAI({ baseURL: process.env.BASE_URL + "/v1", apiKey: process.env.API_KEY ?? "-", maxRetries: 0 });
const results = {};
async function attempt(name, fn) {
  try {
    await fn();
    results[name] = null;
  } catch (err) {
    results[name] = { class: err.constructor.name, status: err.status, param: err.param ?? null, code: err.code ?? null };
  }
}
await attempt("bad_request", () => client.chat.completions.create({ model: "tgi", messages: [{ role: "user", content: "x" }], temperature: 9 }));
await attempt("not_found", () => client.models.retrieve("gpt-4o"));
await attempt("unauthorized", () => new OpenAI({ baseURL: process.env.BASE_URL + "/v1", apiKey: "wrong", maxRetries: 0 }).models.list());
console.log(JSON.stringify(results));
