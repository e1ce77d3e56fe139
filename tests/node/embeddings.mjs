// client.embeddings.create with the package's default (base64, decoded by the client) and with floats.
import OpenAI from "openai";

const client = new OpenAI({ baseURL: process.env.BASE_URL + "/v1", apiKey: process.env.API_KEY ?? "-" });
const input = ["The Eiffel Tower is in Paris.", "A short one."];
const asDefault = await client.embeddings.create({ model: "text-embedding-3-small", input });
const asFloat = await client.embeddings.create({ model: "text-embedding-3-small", input, encoding_format: "float" });
let dimensionsError = null;
try {
  await client.embeddings.create({ model: "text-embedding-3-small", input, dimensions: 64 });
} catch (err) {
  dimensionsError = { class: err.constructor.name, status: err.status, param: err.param };
}
console.log(JSON.stringify({ asDefault, asFloat, dimensionsError }));
