// The Node example of the TGI OpenAI-compatible API guide, as plain JavaScript.
// BASE_URL and API_KEY come from the environment (the guide hard-codes http://localhost:8080/v1 and "-").
import OpenAI from "openai";

const client = new OpenAI({
  baseURL: process.env.BASE_URL,
  apiKey: process.env.API_KEY ?? "-",
});

const completion = await client.chat.completions.create({
  model: "tgi",
  messages: [
    { role: "system", content: "You are a concise API assistant." },
    { role: "user", content: "Explain the TGI OpenAI-compatible API." },
  ],
  max_tokens: Number(process.env.MAX_TOKENS ?? 120),
  temperature: 0,
});

console.log(JSON.stringify(completion));
