/**
 * Client identity keys: Ed25519 through WebCrypto. The server stores only public keys, so a
 * stolen server config lets nobody pose as a client.
 * @module
 */
import { createPrivateKey, createPublicKey, generateKeyPairSync } from "node:crypto";

/** Reads a PKCS#8 PEM Ed25519 private key, as `deno task keygen` or `openssl genpkey` write. */
export async function importPrivateKey(pem: string): Promise<CryptoKey> {
  const key = createPrivateKey(pem);
  if (key.asymmetricKeyType !== "ed25519") {
    throw new Error(`expected an Ed25519 key, found ${key.asymmetricKeyType ?? "an unknown"} key`);
  }
  const der = key.export({ format: "der", type: "pkcs8" });
  return await crypto.subtle.importKey("pkcs8", new Uint8Array(der), "Ed25519", false, ["sign"]);
}

/** The base64 SPKI line for the server's `[clients]` table, from a private key's PEM. */
export function publicKeyLine(privatePem: string): string {
  const der = createPublicKey(createPrivateKey(privatePem)).export({ format: "der", type: "spki" });
  return new Uint8Array(der).toBase64();
}

/** Imports a client's public key from SPKI DER; throws if it is not Ed25519. */
export async function importPublicKey(spkiDer: Uint8Array<ArrayBuffer>): Promise<CryptoKey> {
  return await crypto.subtle.importKey("spki", spkiDer, "Ed25519", false, ["verify"]);
}

/** Signs `data` with an Ed25519 private key. */
export async function sign(key: CryptoKey, data: Uint8Array<ArrayBuffer>): Promise<Uint8Array> {
  return new Uint8Array(await crypto.subtle.sign("Ed25519", key, data));
}

/** Checks an Ed25519 signature; false rather than a throw for any malformed input. */
export async function verify(
  key: CryptoKey,
  signature: Uint8Array<ArrayBuffer>,
  data: Uint8Array<ArrayBuffer>,
): Promise<boolean> {
  try {
    return await crypto.subtle.verify("Ed25519", key, signature, data);
  } catch {
    return false;
  }
}

/** Makes a new Ed25519 key pair: PKCS#8 PEM private key and base64 SPKI public key. */
export function generateKeyPair(): { privatePem: string; publicKey: string } {
  const { privateKey, publicKey } = generateKeyPairSync("ed25519", {
    privateKeyEncoding: { type: "pkcs8", format: "pem" },
    publicKeyEncoding: { type: "spki", format: "der" },
  });
  return { privatePem: privateKey, publicKey: new Uint8Array(publicKey).toBase64() };
}
