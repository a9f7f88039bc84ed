/**
 * Certificate generation for the communication channel: a private CA and a server certificate
 * signed by it, named as the original NATadm named them.
 * @module
 */
import * as x509 from "@peculiar/x509";
import { isIP } from "node:net";
import { fileURLToPath } from "node:url";

x509.cryptoProvider.set(crypto);

const ALGORITHM = { name: "ECDSA", namedCurve: "P-256", hash: "SHA-256" };
const DAY_MS = 86_400_000;

/** File names written by {@link generateCertificates}, as in the original's README. */
export const CERT_FILES = {
  caCert: "communication.ca.pem",
  caKey: "communication.ca.key.pem",
  cert: "communication.crt.pem",
  key: "communication.key.pem",
} as const;

/** The repository's `certs/` folder: where `deno task certs` and `keygen` write by default. */
export const DEFAULT_CERTS_DIR = fileURLToPath(new URL("../certs", import.meta.url));

/** PEM texts of a fresh CA and a server certificate signed by it. */
export interface GeneratedCertificates {
  caCert: string;
  caKey: string;
  cert: string;
  key: string;
}

function serial(): string {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  bytes[0] &= 0x7f; // positive, as RFC 5280 requires
  return bytes.toHex();
}

async function privatePem(key: CryptoKey): Promise<string> {
  return x509.PemConverter.encode(await crypto.subtle.exportKey("pkcs8", key), "PRIVATE KEY");
}

/**
 * Makes a CA (10 years) and a server certificate (2 years) valid for every name in `hosts`.
 * With `peer`, the certificate also serves as a TLS client certificate (extended key usage
 * clientAuth), as a cluster's servers present to one another on their peer links.
 */
export async function generateCertificates(
  hosts: string[],
  options: { peer?: boolean } = {},
): Promise<GeneratedCertificates> {
  const now = Date.now();
  const notBefore = new Date(now - DAY_MS);
  const caKeys = await crypto.subtle.generateKey(ALGORITHM, true, ["sign", "verify"]);
  const ca = await x509.X509CertificateGenerator.createSelfSigned({
    serialNumber: serial(),
    name: "CN=NATadm communication CA",
    notBefore,
    notAfter: new Date(now + 3650 * DAY_MS),
    keys: caKeys,
    signingAlgorithm: ALGORITHM,
    extensions: [
      new x509.BasicConstraintsExtension(true, 0, true),
      new x509.KeyUsagesExtension(
        x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign,
        true,
      ),
      await x509.SubjectKeyIdentifierExtension.create(caKeys.publicKey),
    ],
  });
  const keys = await crypto.subtle.generateKey(ALGORITHM, true, ["sign", "verify"]);
  const cert = await x509.X509CertificateGenerator.create({
    serialNumber: serial(),
    subject: `CN=${hosts[0].replace(/[,+="<>#;\\]/g, "")}`,
    issuer: ca.subject,
    notBefore,
    notAfter: new Date(now + 730 * DAY_MS),
    signingKey: caKeys.privateKey,
    publicKey: keys.publicKey,
    signingAlgorithm: ALGORITHM,
    extensions: [
      new x509.BasicConstraintsExtension(false, undefined, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature, true),
      new x509.ExtendedKeyUsageExtension(
        options.peer
          ? [x509.ExtendedKeyUsage.serverAuth, x509.ExtendedKeyUsage.clientAuth]
          : [x509.ExtendedKeyUsage.serverAuth],
      ),
      new x509.SubjectAlternativeNameExtension(
        hosts.map((h) => ({ type: isIP(h) ? "ip" as const : "dns" as const, value: h })),
      ),
      await x509.AuthorityKeyIdentifierExtension.create(ca),
      await x509.SubjectKeyIdentifierExtension.create(keys.publicKey),
    ],
  });
  return {
    caCert: ca.toString("pem") + "\n",
    caKey: await privatePem(caKeys.privateKey),
    cert: cert.toString("pem") + "\n",
    key: await privatePem(keys.privateKey),
  };
}
