// Two requests on one bidirectional Generate stream to a pagewire gateway.
//
//   npm install && node client.js [HOST:PORT]      (default 127.0.0.1:50051)
//
// The .proto files are read from the repository's protos/ directory, or from
// PAGEWIRE_PROTOS when this directory is copied elsewhere.
"use strict";

const path = require("node:path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");
// google/rpc/status.proto, which the pagewire protos import.
const googleProtos = require("google-proto-files").getProtoPath("..");

const target = process.argv[2] || "127.0.0.1:50051";
const protos = process.env.PAGEWIRE_PROTOS || path.join(__dirname, "..", "..", "protos");
const definition = protoLoader.loadSync("pagewire/v1/gateway.proto", {
  includeDirs: [protos, googleProtos],
  keepCase: true,
  longs: Number,
  enums: String,
  defaults: true,
  oneofs: true,
});
const { Generation } = grpc.loadPackageDefinition(definition).pagewire.v1;
const client = new Generation(target, grpc.credentials.createInsecure());

const prompts = { colours: "Name three colours.", fruit: "Name three fruits." };
const texts = Object.fromEntries(Object.keys(prompts).map((id) => [id, ""]));
let open = Object.keys(prompts).length;

const stream = client.Generate();
stream.on("data", (message) => {
  for (const chunk of message.chunks) {
    texts[chunk.request_id] += chunk.text;
    if (chunk.finish_reason !== "FINISH_REASON_UNSPECIFIED") {
      if (chunk.error && chunk.error.code) {
        console.error(`${chunk.request_id} failed: ${chunk.error.message}`);
        process.exitCode = 1;
      } else {
        const usage = chunk.usage;
        console.log(`${chunk.request_id} [${chunk.finish_reason}, ${usage.completion_tokens} tokens]: ${texts[chunk.request_id]}`);
      }
      if (--open === 0) stream.end();
    }
  }
});
stream.on("error", (error) => {
  console.error(`stream failed: ${error.message}`);
  process.exitCode = 1;
});
stream.on("end", () => client.close());

for (const [request_id, content] of Object.entries(prompts)) {
  stream.write({
    start: {
      request_id,
      chat: { messages: [{ role: "user", content }] },
      sampling: { temperature: 0, max_tokens: 24 },
    },
  });
}
