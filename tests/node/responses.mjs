// The package's Responses API: create, the responses.stream() helper (events, then the accumulated final
// response) continuing through previous_response_id, and a 404 for an unknown id.
import OpenAI from "openai";

const client = new OpenAI({ baseURL: process.env.BASE_URL + "/v1", apiKey: process.env.API_KEY ?? "-" });
const format = {
  type: "json_schema",
  name: "answer",
  strict: true,
  schema: {
    type: "object",
    properties: { answer: { enum: ["yes", "no"] } },
    required: ["answer"],
    additionalProperties: false,
  },
};

const created = await client.responses.create({ model: "tgi", input: "Hello", max_output_tokens: 5, temperature: 0 });
const stream = client.responses.stream({
  model: "tgi",
  input: "Is it sunny?",
  previous_response_id: created.id,
  text: { format },
  max_output_tokens: 40,
  temperature: 0,
});
const events = [];
stream.on("event", (event) => events.push({ type: event.type, sequence_number: event.sequence_number }));
const final = await stream.finalResponse();
let notFound = null;
try {
  await client.responses.retrieve("resp_unknown");
} catch (err) {
  notFound = { status: err.status, name: err.constructor.name };
}
console.log(JSON.stringify({
  created: { id: created.id, status: created.status, output_text: created.output_text },
  events,
  final: { status: final.status, output_text: final.output_text, previous_response_id: final.previous_response_id },
  notFound,
}));
