// The cookbook's streaming example (openai-node), printing the text as it arrives.
import OpenAI from "openai";

const openai = new OpenAI({
  baseURL: process.env.BASE_URL + "/v1/",
  apiKey: process.env.API_KEY ?? "-",
});

async function main() {
  const stream = await openai.chat.completions.create({
    model: "tgi",
    messages: [
      { role: "system", content: "You are a helpful assistant." },
      { role: "user", content: "Why is open-source software important?" },
    ],
    stream: true,
    max_tokens: Number(process.env.MAX_TOKENS ?? 500),
    temperature: 0,
  });
  for await (const chunk of stream) {
    process.stdout.write(chunk.choices[0]?.delta?.content || "");
  }
}

main();
