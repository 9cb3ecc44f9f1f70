// TLS material for the services' ports and the gateway's links, read and checked at start-up: a missing
// file, a file that holds no PEM of the right kind, or a key that does not belong to its certificate
// stops the service with a message naming the flag, instead of failing on the first connection.
import { createPrivateKey, X509Certificate } from "node:crypto";
import { readFileSync } from "node:fs";
import { createSecureContext } from "node:tls";
import { type ChannelCredentials, credentials, ServerCredentials } from "@grpc/grpc-js";
import { errorMessage } from "./logging.js";

/** A server's certificate and key, and the CA of the client certificates it requires (mutual TLS). */
export interface ServerTls {
  cert: Buffer;
  key: Buffer;
  clientCa: Buffer | undefined;
}

/** The files of a server's TLS, each with the flag that named it (for messages). */
export interface ServerTlsFiles {
  cert: string;
  key: string;
  clientCa: string;
  flags: { cert: string; key: string; clientCa: string };
}

function readPem(file: string, flag: string): Buffer {
  let contents: Buffer;
  try {
    contents = readFileSync(file);
  } catch (error) {
    throw new Error(`${flag} ${file}: cannot read it (${errorMessage(error)})`);
  }
  if (!contents.includes("-----BEGIN ")) throw new Error(`${flag} ${file}: not a PEM file`);
  return contents;
}

function readCertificates(file: string, flag: string): Buffer {
  const pem = readPem(file, flag);
  try {
    new X509Certificate(pem);
  } catch (error) {
    throw new Error(`${flag} ${file}: no valid certificate in it (${errorMessage(error)})`);
  }
  return pem;
}

function readKey(file: string, flag: string): Buffer {
  const pem = readPem(file, flag);
  try {
    createPrivateKey(pem);
  } catch (error) {
    throw new Error(`${flag} ${file}: no valid private key in it (${errorMessage(error)})`);
  }
  return pem;
}

/** A certificate and key that both exist, parse, and belong together. */
function readPair(
  certFile: string,
  keyFile: string,
  flags: { cert: string; key: string },
): { cert: Buffer; key: Buffer } {
  if ((certFile === "") !== (keyFile === "")) {
    throw new Error(`${flags.cert} and ${flags.key} go together: give both or neither`);
  }
  const cert = readCertificates(certFile, flags.cert);
  const key = readKey(keyFile, flags.key);
  try {
    createSecureContext({ cert, key });
  } catch (error) {
    throw new Error(
      `${flags.key} ${keyFile} does not fit the certificate of ${flags.cert} ${certFile} (${errorMessage(error)})`,
    );
  }
  return { cert, key };
}

/** undefined when no file is named (plaintext). */
export function loadServerTls(files: ServerTlsFiles): ServerTls | undefined {
  if (files.cert === "" && files.key === "") {
    if (files.clientCa !== "") {
      throw new Error(`${files.flags.clientCa} needs ${files.flags.cert} and ${files.flags.key}`);
    }
    return undefined;
  }
  const pair = readPair(files.cert, files.key, files.flags);
  const clientCa = files.clientCa !== "" ? readCertificates(files.clientCa, files.flags.clientCa) : undefined;
  return { ...pair, clientCa };
}

export function grpcServerCredentials(tls: ServerTls | undefined): ServerCredentials {
  if (!tls) return ServerCredentials.createInsecure();
  return ServerCredentials.createSsl(
    tls.clientCa ?? null,
    [{ private_key: tls.key, cert_chain: tls.cert }],
    tls.clientCa !== undefined,
  );
}

/** The files of a client's TLS: the CA that signed the server, and the client's own pair (optional). */
export interface ClientTlsFiles {
  ca: string;
  cert: string;
  key: string;
  flags: { ca: string; cert: string; key: string };
}

export function grpcClientCredentials(files: ClientTlsFiles): ChannelCredentials {
  if (files.ca === "") {
    if (files.cert !== "" || files.key !== "") {
      throw new Error(`${files.flags.cert} and ${files.flags.key} need ${files.flags.ca}`);
    }
    return credentials.createInsecure();
  }
  const ca = readCertificates(files.ca, files.flags.ca);
  if (files.cert === "" && files.key === "") return credentials.createSsl(ca);
  const pair = readPair(files.cert, files.key, files.flags);
  return credentials.createSsl(ca, pair.key, pair.cert);
}
