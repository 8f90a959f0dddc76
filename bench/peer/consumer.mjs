// The peer of `python -m bench --only peer`: bbc/sqs-consumer with a handler doing the daemon's happy path.
//
// verify the job's signature (t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>, consumer/signing.py)
//   -> GET the recording from S3 -> POST it to /audio/transcriptions as multipart (the OpenAI API's shape)
//   -> POST the `completed` callback to WordPress -> return the message, so sqs-consumer deletes it.
// Any failure throws: sqs-consumer emits processing_error and, with terminateVisibilityTimeout set, makes the
// message visible again after that many seconds (the library's own retry; nothing is remembered between
// deliveries, so a redelivered job is transcribed again).
//
// Configuration comes from the environment (bench/peer.py sets it); the process prints one JSON line
// `{"event":"started"}` once polling has begun, and one per processing error.
import crypto from "node:crypto";
import path from "node:path";
import { SQSClient } from "@aws-sdk/client-sqs";
import { GetObjectCommand, S3Client } from "@aws-sdk/client-s3";
import { Consumer } from "sqs-consumer";

const env = (name, fallback) => {
  const value = process.env[name] ?? fallback;
  if (value === undefined) throw new Error(`${name} is not set`);
  return value;
};

const endpoint = env("AWS_ENDPOINT_URL");
const region = env("AWS_REGION", "us-east-1");
const secret = env("SIDE_CAR_SECRET");
const bucket = env("S3_BUCKET");
const openaiBase = env("OPENAI_BASE_URL").replace(/\/$/, "");
const openaiKey = env("OPENAI_API_KEY");
const model = env("TRANSCRIBE_MODEL", "gpt-transcribe");
const callbackUrl = env("WP_SIDE_CAR_CALLBACK");
const serverToken = env("WP_SERVER_TOKEN");

// moto serves S3 on one host, so path-style addressing (as boto3 does against an endpoint URL).
const s3 = new S3Client({ endpoint, region, forcePathStyle: true });
const sqs = new SQSClient({ endpoint, region });

function verify(body, header) {
  if (!header) throw new Error("message is not signed");
  let t = null;
  const digests = [];
  for (const item of header.split(",")) {
    const [key, value] = item.trim().split("=", 2);
    if (key === "t" && /^\d{1,12}$/.test(value ?? "")) t = value;
    else if (key === "v1" && value) digests.push(value.toLowerCase());
  }
  if (t === null || digests.length === 0) throw new Error("signature is malformed");
  const expected = crypto.createHmac("sha256", secret).update(`${t}.${body}`).digest();
  const ok = digests.some((d) => {
    const given = Buffer.from(d, "hex");
    return given.length === expected.length && crypto.timingSafeEqual(given, expected);
  });
  if (!ok) throw new Error("signature does not match");
}

async function handleMessage(message) {
  const body = message.Body ?? "";
  verify(body, message.MessageAttributes?.signature?.StringValue);
  const job = JSON.parse(body);
  const started = Date.now();
  const object = await s3.send(new GetObjectCommand({ Bucket: job.s3_bucket ?? bucket, Key: job.s3_key }));
  const audio = await object.Body.transformToByteArray();
  const downloaded = Date.now();

  const form = new FormData();
  form.append("file", new Blob([audio]), path.basename(job.s3_key));
  form.append("model", model);
  form.append("response_format", "json");
  const reply = await fetch(`${openaiBase}/audio/transcriptions`, {
    method: "POST", headers: { Authorization: `Bearer ${openaiKey}` }, body: form,
  });
  if (!reply.ok) throw new Error(`transcription answered HTTP ${reply.status}`);
  const transcript = await reply.json();
  const transcribed = Date.now();

  const callback = await fetch(callbackUrl, {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-Server-Token": serverToken },
    body: JSON.stringify({
      job_id: job.job_id, status: "completed", server_token: serverToken,
      transcript: { text: transcript.text },
      timings: { download_ms: downloaded - started, transcribe_ms: transcribed - downloaded,
                 total_ms: Date.now() - started },
    }),
  });
  await callback.arrayBuffer();
  if (!callback.ok) throw new Error(`callback answered HTTP ${callback.status}`);
  return message;
}

const app = Consumer.create({
  queueUrl: env("SQS_QUEUE_URL"),
  sqs,
  handleMessage,
  batchSize: Number(env("BATCH_SIZE", "4")),
  waitTimeSeconds: Number(env("POLL_WAIT_SECONDS", "20")),
  visibilityTimeout: Number(env("VISIBILITY_TIMEOUT", "120")),
  heartbeatInterval: Number(env("HEARTBEAT_INTERVAL", "40")),
  terminateVisibilityTimeout: Number(env("RETRY_DELAY_SECONDS", "15")),
  messageAttributeNames: ["signature"],
});
const say = (event, extra = {}) => process.stdout.write(`${JSON.stringify({ event, ...extra })}\n`);
app.on("error", (err) => say("error", { message: err.message }));
app.on("processing_error", (err) => say("processing_error", { message: err.message }));
app.on("started", () => say("started"));
const stop = () => { app.stop({ abort: false }); setTimeout(() => process.exit(0), 200); };
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
app.start();
