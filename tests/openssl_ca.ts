/**
 * A certificate authority made with `openssl`, for tests that need server certificates for
 * chosen names, dates and CAs: several certificates from one CA, or one from a stranger.
 * @module
 */
import type { Fixture } from "./helpers.ts";
import { sh } from "./helpers.ts";

/** A CA made with openssl that issues server certificates, in its own directory. */
export class OpensslCa {
  private constructor(readonly dir: string) {}

  get caPath(): string {
    return `${this.dir}/ca.pem`;
  }

  static async create(fixture: Fixture, name: string): Promise<OpensslCa> {
    const dir = fixture.path(name);
    await Deno.mkdir(`${dir}/issued`, { recursive: true });
    await Deno.writeTextFile(`${dir}/index.txt`, "");
    await Deno.writeTextFile(`${dir}/serial`, "1000\n");
    await Deno.writeTextFile(
      `${dir}/openssl.cnf`,
      `[ req ]
distinguished_name = dn
prompt = no
[ dn ]
CN = unused
[ ca_ext ]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[ ca ]
default_ca = this
[ this ]
database = ${dir}/index.txt
new_certs_dir = ${dir}/issued
certificate = ${dir}/ca.pem
private_key = ${dir}/ca.key
serial = ${dir}/serial
default_md = sha256
policy = any
unique_subject = no
[ any ]
commonName = supplied
`,
    );
    await sh("openssl", [
      "req",
      "-x509",
      "-config",
      "openssl.cnf",
      "-extensions",
      "ca_ext",
      "-newkey",
      "ec",
      "-pkeyopt",
      "ec_paramgen_curve:P-256",
      "-nodes",
      "-keyout",
      "ca.key",
      "-out",
      "ca.pem",
      "-days",
      "30",
      "-subj",
      `/CN=${name} CA`,
    ], dir);
    return new OpensslCa(dir);
  }

  /**
   * Issues a server certificate for `san` (e.g. `DNS:localhost,IP:127.0.0.1`), valid from
   * `start` to `end` (openssl's YYYYMMDDHHMMSSZ; default: now for 30 days). Returns the
   * certificate and key paths.
   */
  async issue(
    file: string,
    san: string,
    dates?: { start: string; end: string },
  ): Promise<[string, string]> {
    const [cert, key, csr, ext] = ["crt.pem", "key.pem", "csr", "ext"].map((x) =>
      `${this.dir}/${file}.${x}`
    );
    await Deno.writeTextFile(
      ext,
      `basicConstraints = CA:FALSE\nkeyUsage = critical,digitalSignature\n` +
        `extendedKeyUsage = serverAuth\nsubjectAltName = ${san}\n`,
    );
    await sh("openssl", [
      "req",
      "-new",
      "-config",
      "openssl.cnf",
      "-newkey",
      "ec",
      "-pkeyopt",
      "ec_paramgen_curve:P-256",
      "-nodes",
      "-keyout",
      key,
      "-out",
      csr,
      "-subj",
      `/CN=${file}`,
    ], this.dir);
    await Deno.chmod(key, 0o600);
    const validity = dates ? ["-startdate", dates.start, "-enddate", dates.end] : ["-days", "30"];
    await sh("openssl", [
      "ca",
      "-batch",
      "-config",
      "openssl.cnf",
      "-notext",
      "-in",
      csr,
      "-out",
      cert,
      "-extfile",
      ext,
      ...validity,
    ], this.dir);
    return [cert, key];
  }
}
