// PutObject and GetObject through cmek-proxy with the AWS JS SDK v3 (default checksums).
// Usage: node roundtrip.mjs <endpoint> <bucket> <data file>; credentials from AWS_* env vars.
// Prints one JSON document with what each call returned.
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import { Readable } from "node:stream";
import { GetObjectCommand, PutObjectCommand, S3Client } from "@aws-sdk/client-s3";

const [endpoint, bucket, dataFile] = process.argv.slice(2);
const data = readFileSync(dataFile);
const sha = (buf) => createHash("sha256").update(buf).digest("hex");

const s3 = new S3Client({
  endpoint,
  region: process.env.AWS_REGION,
  forcePathStyle: true, // 127.0.0.1 has no bucket subdomains
  maxAttempts: 1,
});

// What went on the wire for each PutObject (the deserialize step sees the signed request).
const sent = [];
s3.middlewareStack.add(
  (next, context) => async (args) => {
    if (context.commandName === "PutObjectCommand") {
      const h = args.request.headers;
      sent.push({
        contentSha256: h["x-amz-content-sha256"],
        contentEncoding: h["content-encoding"] ?? null,
        trailer: h["x-amz-trailer"] ?? null,
        crc32Header: h["x-amz-checksum-crc32"] ?? null,
      });
    }
    return next(args);
  },
  { step: "deserialize", name: "recordSentHeaders" },
);

async function bodyBytes(resp) {
  return Buffer.from(await resp.Body.transformToByteArray());
}

const out = {};
// A buffer body: the checksum goes in a header.
const putBuf = await s3.send(
  new PutObjectCommand({ Bucket: bucket, Key: "js/buffer.bin", Body: data }),
);
out.putBuffer = { etag: putBuf.ETag, crc32: putBuf.ChecksumCRC32, sse: putBuf.ServerSideEncryption };
// A stream body: aws-chunked with the CRC32 in a trailer.
const putStream = await s3.send(
  new PutObjectCommand({
    Bucket: bucket,
    Key: "js/stream.bin",
    Body: Readable.from([data.subarray(0, 100000), data.subarray(100000)]),
    ContentLength: data.length,
    ChecksumAlgorithm: "CRC32",
  }),
);
out.putStream = { etag: putStream.ETag, crc32: putStream.ChecksumCRC32 };
for (const key of ["js/buffer.bin", "js/stream.bin"]) {
  const got = await s3.send(new GetObjectCommand({ Bucket: bucket, Key: key }));
  const body = await bodyBytes(got);
  out[key] = { sha256: sha(body), length: body.length, contentLength: got.ContentLength, etag: got.ETag };
}
const ranged = await s3.send(
  new GetObjectCommand({ Bucket: bucket, Key: "js/stream.bin", Range: "bytes=65530-65549" }),
);
out.range = { hex: (await bodyBytes(ranged)).toString("hex"), contentRange: ranged.ContentRange };
out.sent = sent;
process.stdout.write(JSON.stringify(out));
