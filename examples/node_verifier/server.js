// An rpp.v1.RewardService verifier in Node.js: exact match of the response against the reference.
//
//   npm ci && node server.js --port 50053          # prints "listening on 127.0.0.1:50053"
//   RPP_REWARD_TOKEN=secret node server.js --port 0 --host 0.0.0.0
//
// It loads protos/rpp/v1/reward.proto directly (no generated code), answers the status codes the
// contract requires (INVALID_ARGUMENT naming sample ids, UNAUTHENTICATED without the token), and
// drains in-flight calls on SIGTERM. Health and reflection are left out to keep the example
// short; add grpc-health-check for orchestrators in production.
"use strict";

const path = require("path");
const crypto = require("crypto");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO = path.join(__dirname, "..", "..", "protos", "rpp", "v1", "reward.proto");
const MAX_CHARS = 1000000; // longest string accepted in a sample
const MAX_SAMPLES = 4096; // reported by GetInfo

const definition = protoLoader.loadSync(PROTO, { keepCase: true, defaults: true });
const rpp = grpc.loadPackageDefinition(definition).rpp.v1;

function flag(name, fallback) {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1] : fallback;
}

// Constant-time comparison, so response time does not reveal how much of the token matched.
function authorized(call, token) {
  if (!token) return true;
  const sent = Buffer.from(String(call.metadata.get("authorization")[0] || ""));
  const expected = Buffer.from(`Bearer ${token}`);
  return sent.length === expected.length && crypto.timingSafeEqual(sent, expected);
}

// Every problem with the request in one message, naming the sample ids.
function validate(samples) {
  if (samples.length === 0) return "ScoreRequest.samples is empty: send at least one sample";
  if (samples.length > MAX_SAMPLES) return `${samples.length} samples; at most ${MAX_SAMPLES}`;
  const emptyResponse = [];
  const noReference = [];
  const tooLong = [];
  const duplicates = [];
  const seen = new Set();
  samples.forEach((s, i) => {
    const id = s.id || `#${i}`;
    if (!s.response) emptyResponse.push(id);
    if (!s.reference) noReference.push(id);
    if ([s.prompt, s.response, s.reference].some((x) => x.length > MAX_CHARS)) tooLong.push(id);
    if (seen.has(s.id)) duplicates.push(id);
    seen.add(s.id);
  });
  const problems = [];
  if (emptyResponse.length) problems.push(`empty response in samples ${emptyResponse.join(", ")}`);
  if (noReference.length) problems.push(`reference missing in samples ${noReference.join(", ")}`);
  if (tooLong.length) problems.push(`strings over ${MAX_CHARS} chars in samples ${tooLong.join(", ")}`);
  if (duplicates.length) problems.push(`duplicate sample ids ${duplicates.join(", ")}`);
  return problems.join("; ");
}

// The scoring rule: 1.0 when the trimmed response equals the trimmed reference.
function score(sample) {
  const match = sample.response.trim() === sample.reference.trim();
  return {
    id: sample.id,
    reward: match ? 1.0 : 0.0,
    info: match ? { correct: "true" } : { correct: "false", error: "wrong_answer" },
  };
}

function main() {
  const host = flag("host", "127.0.0.1");
  const port = flag("port", "50053");
  const token = process.env.RPP_REWARD_TOKEN || "";
  const server = new grpc.Server({ "grpc.max_receive_message_length": 256 * 1024 * 1024 });

  server.addService(rpp.RewardService.service, {
    Score(call, callback) {
      if (!authorized(call, token)) {
        return callback({ code: grpc.status.UNAUTHENTICATED, details: "missing or invalid bearer token" });
      }
      const samples = call.request.samples;
      const problem = validate(samples);
      if (problem) return callback({ code: grpc.status.INVALID_ARGUMENT, details: problem });
      const start = process.hrtime.bigint();
      const scores = samples.map(score);
      const ms = Number(process.hrtime.bigint() - start) / 1e6;
      console.log(`scored samples=${samples.length} latency_ms=${ms.toFixed(1)}`);
      callback(null, { scores });
    },
    GetInfo(call, callback) {
      if (!authorized(call, token)) {
        return callback({ code: grpc.status.UNAUTHENTICATED, details: "missing or invalid bearer token" });
      }
      callback(null, {
        name: "node-exact-match",
        kind: "verifier",
        version: require("./package.json").version,
        requires_reference: true,
        max_samples_per_request: MAX_SAMPLES,
      });
    },
  });

  server.bindAsync(`${host}:${port}`, grpc.ServerCredentials.createInsecure(), (err, bound) => {
    if (err) {
      console.error(`could not bind ${host}:${port}: ${err.message}`);
      process.exit(1);
    }
    console.log(`listening on ${host}:${bound}`);
  });

  // Drain: refuse new calls, let in-flight ones finish, then exit 0.
  process.on("SIGTERM", () => server.tryShutdown(() => process.exit(0)));
  process.on("SIGINT", () => server.tryShutdown(() => process.exit(0)));
}

main();
