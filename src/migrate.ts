/**
 * Migration from the original NATadm (Python, 2014), whose config files were Python source:
 * `NATadm.conf` for a client, `NATadm_server.conf` for a server.
 *
 * The files are read with a tokenizer and parser for exactly the literal subset those files
 * use: assignments `key = value`, one per line, whose values are integers, floats,
 * True/False/None, strings (' or ", optionally triple-quoted or raw, with Python's escapes),
 * tuples, lists and dicts, with `#` comments. Nothing is ever evaluated: a name, an attribute,
 * a call, an operator or an import is an error that names file:line:column and what was
 * expected there. {@link migrateConfig} then maps the keys onto this project's TOML.
 * @module
 */
import { checkName } from "./protocol.ts";

/** A problem in a file being migrated; the message starts with `file:line:column:`. */
export class MigrateError extends Error {
  override name = "MigrateError";
}

/** A place in the source: 1-based line and column (in characters), and the 0-based offset. */
export interface Pos {
  /** Line, from 1. */
  line: number;
  /** Column in characters, from 1. */
  column: number;
  /** Offset in UTF-16 code units, from 0. */
  offset: number;
}

/** A parsed Python literal, with where it starts. */
export type PyValue =
  | { type: "int" | "float"; value: number; pos: Pos }
  | { type: "str"; value: string; pos: Pos }
  | { type: "bool"; value: boolean; pos: Pos }
  | { type: "none"; pos: Pos }
  | { type: "tuple" | "list"; items: PyValue[]; pos: Pos }
  | { type: "dict"; entries: { key: PyValue; value: PyValue }[]; pos: Pos };

/** One `key = value` line of a parsed file; `text` is its source, as written. */
export interface Assignment {
  /** The key assigned to. */
  name: string;
  /** Its value. */
  value: PyValue;
  /** Where the key starts. */
  pos: Pos;
  /** The assignment's source text, comments on its last line included. */
  text: string;
}

type Token =
  | { kind: "name"; text: string; pos: Pos }
  | { kind: "number"; text: string; pos: Pos }
  | { kind: "string"; value: string; text: string; pos: Pos }
  | { kind: "op"; text: string; pos: Pos }
  | { kind: "newline"; pos: Pos }
  | { kind: "eof"; pos: Pos };

const OPENERS: Record<string, string> = { "(": ")", "[": "]", "{": "}" };
/**
 * How deep tuples, lists and dicts may nest. The original's configs nest three levels at most;
 * the limit keeps a hostile file from exhausting the parser's stack.
 */
export const MAX_NESTING = 100;
/** A name (or a string prefix), matched at `lastIndex`. */
const WORD = /[\p{L}\p{Nl}_][\p{L}\p{Nl}\p{Mn}\p{Mc}\p{Nd}\p{Pc}]*/uy;
/** A number, as Python's tokenizer sees one (checked afterwards), matched at `lastIndex`. */
const NUMBER = /(?:\d[\w.]*|\.\d[\w.]*)(?:(?<=[eE])[+-][\w.]*)?/y;
/** Python's keywords: a line starting with one is a statement, never an assignment. */
const KEYWORDS = new Set(
  ("and as assert async await break class continue def del elif else except finally for from " +
    "global if import in is lambda nonlocal not or pass raise return try while with yield")
    .split(" "),
);
const SIMPLE_ESCAPES: Record<string, string> = {
  "\\": "\\",
  "'": "'",
  '"': '"',
  a: "\x07",
  b: "\b",
  f: "\f",
  n: "\n",
  r: "\r",
  t: "\t",
  v: "\v",
};

/** Splits Python source into tokens, tracking positions, brackets and logical lines. */
class Tokenizer {
  #i = 0;
  #line = 1;
  #lineStart = 0;
  /** Open brackets, innermost last: inside them, line breaks do not end a statement. */
  #brackets: { char: string; pos: Pos }[] = [];
  #atLineStart = true;
  /** The column of offset {@link #columnOffset}, so that columns are counted once, not per token. */
  #column = 1;
  #columnOffset = 0;

  constructor(readonly text: string, readonly file: string) {
    if (text.startsWith("\uFEFF")) this.#i = this.#lineStart = 1;
  }

  get pos(): Pos {
    // Columns count characters (code points), as an editor shows them. They are counted on from
    // the last position asked for on this line, so a long line costs its length once.
    if (this.#columnOffset < this.#lineStart || this.#columnOffset > this.#i) {
      this.#column = 1;
      this.#columnOffset = this.#lineStart;
    }
    const t = this.text;
    for (let j = this.#columnOffset; j < this.#i; j++) {
      const unit = t.charCodeAt(j);
      // The second half of a surrogate pair is the same character as the first.
      const low = unit >= 0xdc00 && unit <= 0xdfff;
      if (!low || j === this.#lineStart || !isHighSurrogate(t.charCodeAt(j - 1))) this.#column++;
    }
    this.#columnOffset = this.#i;
    return { line: this.#line, column: this.#column, offset: this.#i };
  }

  fail(pos: Pos, message: string): never {
    throw new MigrateError(`${this.file}:${pos.line}:${pos.column}: ${message}`);
  }

  #newline(): void {
    if (this.text[this.#i] === "\r" && this.text[this.#i + 1] === "\n") this.#i++;
    this.#i++;
    this.#line++;
    this.#lineStart = this.#i;
  }

  #isNewline(c: string | undefined): boolean {
    return c === "\n" || c === "\r";
  }

  /** The next token; line breaks inside brackets, blank lines and comments are skipped. */
  next(): Token {
    const t = this.text;
    for (;;) {
      const start = this.pos;
      let indented = false;
      while (t[this.#i] === " " || t[this.#i] === "\t" || t[this.#i] === "\f") {
        this.#i++;
        indented = true;
      }
      const c = t[this.#i];
      if (c === "#") {
        while (this.#i < t.length && !this.#isNewline(t[this.#i])) this.#i++;
        continue;
      }
      if (c === "\\" && this.#isNewline(t[this.#i + 1])) {
        this.#i++;
        this.#newline();
        this.#atLineStart = false;
        continue;
      }
      if (this.#isNewline(c)) {
        const pos = this.pos;
        this.#newline();
        if (this.#brackets.length > 0 || this.#atLineStart) continue;
        this.#atLineStart = true;
        return { kind: "newline", pos };
      }
      if (c === undefined) {
        const open = this.#brackets.at(-1);
        if (open) {
          this.fail(
            this.pos,
            `unexpected end of file: "${open.char}" opened at ` +
              `${open.pos.line}:${open.pos.column} is never closed`,
          );
        }
        return { kind: "eof", pos: this.pos };
      }
      if (indented && this.#atLineStart && this.#brackets.length === 0) {
        this.fail(start, "unexpected indentation: each `key = value` starts at the line's start");
      }
      this.#atLineStart = false;
      return this.#token();
    }
  }

  #token(): Token {
    const t = this.text;
    const pos = this.pos;
    const c = t[this.#i];
    WORD.lastIndex = this.#i;
    const word = WORD.exec(t);
    if (word) {
      const quote = t[this.#i + word[0].length];
      if (
        (quote === "'" || quote === '"') && /^(?:[rRuUbBfF]|[rR][bBfF]|[bBfF][rR])$/.test(word[0])
      ) {
        const prefix = word[0].toLowerCase();
        if (prefix.includes("b")) this.fail(pos, "bytes literals (b'...') are not supported");
        if (prefix.includes("f")) {
          this.fail(pos, "f-strings are not supported: they evaluate code; write a plain string");
        }
        this.#i += word[0].length;
        return this.#string(pos, prefix.includes("r"));
      }
      this.#i += word[0].length;
      return { kind: "name", text: word[0], pos };
    }
    if (c === "'" || c === '"') return this.#string(pos, false);
    NUMBER.lastIndex = this.#i;
    const number = NUMBER.exec(t);
    if (number) {
      this.#i += number[0].length;
      return { kind: "number", text: number[0], pos };
    }
    if (c in OPENERS) this.#brackets.push({ char: c, pos });
    if (c === ")" || c === "]" || c === "}") {
      const open = this.#brackets.pop();
      if (!open) this.fail(pos, `"${c}" closes no open bracket`);
      if (OPENERS[open.char] !== c) {
        this.fail(
          pos,
          `"${c}" does not match "${open.char}" opened at ${open.pos.line}:${open.pos.column}`,
        );
      }
    }
    const char = String.fromCodePoint(t.codePointAt(this.#i)!);
    this.#i += char.length;
    return { kind: "op", text: char, pos };
  }

  /** A string literal, the opening quote at the current position. */
  #string(pos: Pos, raw: boolean): Token {
    const t = this.text;
    const from = pos.offset;
    const quote = t[this.#i];
    const triple = t.startsWith(quote.repeat(3), this.#i);
    this.#i += triple ? 3 : 1;
    let value = "";
    for (;;) {
      const c = t[this.#i];
      if (c === undefined || (!triple && this.#isNewline(c))) {
        this.fail(
          pos,
          `unterminated string: the ${quote} opened here is not closed ${
            triple ? "before the end of the file" : "on the same line"
          }`,
        );
      }
      if (triple ? t.startsWith(quote.repeat(3), this.#i) : c === quote) {
        this.#i += triple ? 3 : 1;
        return { kind: "string", value, text: t.slice(from, this.#i), pos };
      }
      if (this.#isNewline(c)) {
        value += "\n";
        this.#newline();
        continue;
      }
      if (c !== "\\") {
        const char = String.fromCodePoint(t.codePointAt(this.#i)!);
        value += char;
        this.#i += char.length;
        continue;
      }
      const escapePos = this.pos;
      const e = t[this.#i + 1];
      if (e === undefined) {
        // A backslash as the file's last character escapes nothing: the string never ends.
        this.fail(
          pos,
          `unterminated string: the ${quote} opened here is not closed before the end of the file`,
        );
      }
      if (raw) {
        // A raw string keeps the backslash, but it still protects a quote or a line break.
        if (this.#isNewline(e)) {
          value += "\\\n";
          this.#i++;
          this.#newline();
          continue;
        }
        value += "\\" + e;
        this.#i += 2;
        continue;
      }
      if (this.#isNewline(e)) {
        this.#i++;
        this.#newline();
        continue;
      }
      this.#i += 2;
      if (e in SIMPLE_ESCAPES) {
        value += SIMPLE_ESCAPES[e];
      } else if (/[0-7]/.test(e)) {
        let digits = e;
        while (digits.length < 3 && /[0-7]/.test(t[this.#i] ?? "")) digits += t[this.#i++];
        value += String.fromCodePoint(parseInt(digits, 8));
      } else if (e === "x" || e === "u" || e === "U") {
        const n = { x: 2, u: 4, U: 8 }[e];
        const hex = t.slice(this.#i, this.#i + n);
        if (!new RegExp(`^[0-9a-fA-F]{${n}}$`).test(hex)) {
          this.fail(escapePos, `invalid \\${e} escape: expected ${n} hexadecimal digits`);
        }
        const code = parseInt(hex, 16);
        if (code > 0x10ffff) {
          this.fail(escapePos, `\\${e}${hex} is beyond the last Unicode character`);
        }
        value += String.fromCodePoint(code);
        this.#i += n;
      } else if (e === "N") {
        this.fail(escapePos, "\\N{...} escapes are not supported; write the character itself");
      } else {
        // Python keeps an unknown escape as written, backslash included ('C:\certs').
        value += "\\";
        this.#i--;
      }
    }
  }
}

function isHighSurrogate(unit: number): boolean {
  return unit >= 0xd800 && unit <= 0xdbff;
}

/** What a token looks like in an error message. */
function describeToken(tok: Token): string {
  switch (tok.kind) {
    case "name":
      return `the name ${tok.text}`;
    case "number":
      return `the number ${tok.text}`;
    case "string":
      return `the string ${tok.text.length > 40 ? tok.text.slice(0, 37) + "..." : tok.text}`;
    case "op":
      return `"${tok.text}"`;
    case "newline":
      return "the end of the line";
    case "eof":
      return "the end of the file";
  }
}

const VALUE_KINDS = "a value (a number, a string, True, False, None, a tuple, a list or a dict)";

/** Recursive-descent parser over {@link Tokenizer}'s tokens, with one token of lookahead. */
class Parser {
  #tokens: Tokenizer;
  #tok: Token;
  /** Tuples, lists and dicts open around the value being parsed. */
  #depth = 0;

  constructor(readonly text: string, readonly file: string) {
    this.#tokens = new Tokenizer(text, file);
    this.#tok = this.#tokens.next();
  }

  fail(pos: Pos, message: string): never {
    this.#tokens.fail(pos, message);
  }

  #advance(): Token {
    const tok = this.#tok;
    this.#tok = this.#tokens.next();
    return tok;
  }

  #isOp(text: string): boolean {
    return this.#tok.kind === "op" && this.#tok.text === text;
  }

  #expectOp(text: string, context: string): void {
    if (!this.#isOp(text)) {
      this.fail(this.#tok.pos, `expected "${text}" ${context}, found ${describeToken(this.#tok)}`);
    }
    this.#advance();
  }

  parseFile(): Assignment[] {
    const out: Assignment[] = [];
    const seen = new Map<string, Pos>();
    for (;;) {
      const tok = this.#tok;
      if (tok.kind === "eof") return out;
      if (tok.kind === "newline") {
        this.#advance();
        continue;
      }
      const assignment = this.#assignment();
      const earlier = seen.get(assignment.name);
      if (earlier) {
        this.fail(
          assignment.pos,
          `${assignment.name} is assigned a second time ` +
            `(first at ${earlier.line}:${earlier.column}); keep one`,
        );
      }
      seen.set(assignment.name, assignment.pos);
      out.push(assignment);
    }
  }

  #assignment(): Assignment {
    const tok = this.#tok;
    if (tok.kind !== "name") {
      this.fail(tok.pos, `expected an assignment \`key = value\`, found ${describeToken(tok)}`);
    }
    if (KEYWORDS.has(tok.text)) {
      this.fail(
        tok.pos,
        `expected an assignment \`key = value\`, found the Python statement "${tok.text}": ` +
          "only assignments of literal values are read, nothing is executed",
      );
    }
    if (["True", "False", "None"].includes(tok.text)) {
      this.fail(tok.pos, `expected a key name to assign to, found ${tok.text}`);
    }
    this.#advance();
    if (!this.#isOp("=")) {
      const what = this.#isOp("(")
        ? `a call of ${tok.text}(...): nothing is executed`
        : this.#isOp(".")
        ? `"${tok.text}.": only plain names can be assigned`
        : describeToken(this.#tok);
      this.fail(this.#tok.pos, `expected "=" after ${tok.text}, found ${what}`);
    }
    this.#advance();
    const value = this.#value();
    const end = this.#tok;
    if (end.kind !== "newline" && end.kind !== "eof") {
      this.fail(
        end.pos,
        `expected the end of the line after the value of ${tok.text}, found ${describeToken(end)}` +
          (end.kind === "op" && "+-*/%&|^<>@.([".includes(end.text)
            ? " (expressions are not evaluated: write the value itself)"
            : ""),
      );
    }
    const text = this.text.slice(tok.pos.offset, end.pos.offset).trimEnd();
    this.#advance();
    return { name: tok.text, value, pos: tok.pos, text };
  }

  #value(): PyValue {
    const tok = this.#advance();
    switch (tok.kind) {
      case "number":
        return this.#number(tok.text, tok.pos, 1);
      case "string": {
        // Adjacent literals are one string, as in Python: 'a' "b" is "ab".
        let value = tok.value;
        for (let next = this.#tok; next.kind === "string"; next = this.#tok) {
          value += next.value;
          this.#advance();
        }
        return { type: "str", value, pos: tok.pos };
      }
      case "name":
        return this.#name(tok);
      case "op":
        if (tok.text === "-" || tok.text === "+") {
          const num = this.#advance();
          if (num.kind !== "number") {
            this.fail(
              num.pos,
              `expected a number after "${tok.text}", found ${describeToken(num)}`,
            );
          }
          return this.#number(num.text, tok.pos, tok.text === "-" ? -1 : 1);
        }
        if (tok.text in OPENERS) return this.#nested(tok);
    }
    this.fail(tok.pos, `expected ${VALUE_KINDS}, found ${describeToken(tok)}`);
  }

  /** A tuple, list or dict, its opening bracket just read; refused past {@link MAX_NESTING}. */
  #nested(open: Token & { kind: "op" }): PyValue {
    if (this.#depth >= MAX_NESTING) {
      this.fail(
        open.pos,
        `"${open.text}": brackets nested more than ${MAX_NESTING} deep (MAX_NESTING); ` +
          "a config of the original NATadm nests three levels at most",
      );
    }
    this.#depth++;
    try {
      if (open.text === "(") return this.#tuple(open.pos);
      if (open.text === "[") {
        return { type: "list", items: this.#items("]", "in the list"), pos: open.pos };
      }
      return this.#dict(open.pos);
    } finally {
      this.#depth--;
    }
  }

  #number(text: string, pos: Pos, sign: number): PyValue {
    if (/^(?:0|[1-9]\d*)$/.test(text)) {
      const value = sign * Number(text);
      if (!Number.isSafeInteger(value)) this.fail(pos, `the number ${text} is too large`);
      return { type: "int", value, pos };
    }
    if (/^0\d+$/.test(text)) {
      this.fail(pos, `${text}: leading zeros are not allowed in Python 3 integers`);
    }
    if (/^(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?$/.test(text)) {
      return { type: "float", value: sign * Number(text), pos };
    }
    this.fail(pos, `${text} is not a number this reader accepts (decimal integers and floats)`);
  }

  #name(tok: Token & { kind: "name" }): PyValue {
    if (tok.text === "True" || tok.text === "False") {
      return { type: "bool", value: tok.text === "True", pos: tok.pos };
    }
    if (tok.text === "None") return { type: "none", pos: tok.pos };
    let dotted = tok.text;
    while (this.#isOp(".")) {
      this.#advance();
      const part = this.#tok;
      if (part.kind !== "name") break;
      dotted += "." + part.text;
      this.#advance();
    }
    if (this.#isOp("(")) {
      this.fail(
        tok.pos,
        `function call ${dotted}(...) is not allowed: the file is read as data and nothing is ` +
          `evaluated; write the value itself`,
      );
    }
    this.fail(
      tok.pos,
      `unknown name ${dotted}: expected ${VALUE_KINDS}; names are not looked up, ` +
        "nothing is evaluated",
    );
  }

  /** Values separated by commas up to `close` (consumed); a trailing comma is allowed. */
  #items(close: string, context: string): PyValue[] {
    const items: PyValue[] = [];
    while (!this.#isOp(close)) {
      items.push(this.#value());
      if (this.#isOp(close)) break;
      this.#expectOp(",", `or "${close}" after an item ${context}`);
    }
    this.#advance();
    return items;
  }

  #tuple(pos: Pos): PyValue {
    if (this.#isOp(")")) {
      this.#advance();
      return { type: "tuple", items: [], pos };
    }
    const first = this.#value();
    if (this.#isOp(")")) {
      this.#advance();
      return first; // (x) is x itself; (x,) is a tuple.
    }
    this.#expectOp(",", `or ")" after an item in the tuple`);
    return { type: "tuple", items: [first, ...this.#items(")", "in the tuple")], pos };
  }

  #dict(pos: Pos): PyValue {
    const entries: { key: PyValue; value: PyValue }[] = [];
    const seen = new Map<string, Pos>();
    while (!this.#isOp("}")) {
      const key = this.#value();
      if (!this.#isOp(":")) {
        this.fail(
          this.#tok.pos,
          `expected ":" after a key in the dict, found ${describeToken(this.#tok)}` +
            (this.#isOp(",") || this.#isOp("}") ? " (sets are not supported)" : ""),
        );
      }
      this.#advance();
      const canonical = hashKey(key, (p, m) => this.fail(p, m));
      const earlier = seen.get(canonical);
      if (earlier) {
        this.fail(
          key.pos,
          `duplicate key ${canonical} in the dict (first at ${earlier.line}:${earlier.column})`,
        );
      }
      seen.set(canonical, key.pos);
      entries.push({ key, value: this.#value() });
      if (this.#isOp("}")) break;
      this.#expectOp(",", `or "}" after an entry in the dict`);
    }
    this.#advance();
    return { type: "dict", entries, pos };
  }
}

/** A dict key as Python compares it (True == 1), or a failure for an unhashable one. */
function hashKey(key: PyValue, fail: (pos: Pos, message: string) => never): string {
  switch (key.type) {
    case "int":
    case "float":
      return String(key.value);
    case "bool":
      return key.value ? "1" : "0";
    case "none":
      return "None";
    case "str":
      return JSON.stringify(key.value);
    case "tuple":
      return `(${key.items.map((i) => hashKey(i, fail)).join(", ")})`;
    default:
      fail(key.pos, `a ${key.type} cannot be a dict key (it is not hashable)`);
  }
}

/** Parses an original NATadm config file (Python literals only) into its assignments. */
export function parsePythonConfig(text: string, file: string): Assignment[] {
  return new Parser(text, file).parseFile();
}

/** Client keys of the original NATadm's `NATadm.conf`. */
const CLIENT_KEYS = ["name", "remote", "cafile", "interval", "infinite"];
/** Server keys of the original's `NATadm_server.conf`, older releases' control port included. */
const SERVER_KEYS = [
  "communication_port",
  "communication_server_certificate",
  "services",
  "control_port",
  "control_server_certificate",
  "control_client_ca",
];
const CONTROL_ONLY =
  "Only the original's control port (control_port, for WAITFOR commands) used it; NATadm has " +
  "no control port.";
/** Why each original key that has no meaning here is dropped. */
const DROPPED: Record<string, string> = {
  control_port: "The original's control port took WAITFOR commands from an administrator to " +
    "open a service at run time. NATadm has no control port: every service is listed in " +
    "[services], and each user connects straight to its port.",
  control_server_certificate: CONTROL_ONLY,
  control_client_ca: CONTROL_ONLY,
};

/** The result of {@link migrateConfig}. */
export interface Migration {
  /** Which config the original file was, told by its keys. */
  kind: "client" | "server";
  /** The TOML text, with comments for dropped keys and for what the admin must add. */
  toml: string;
  /** What the admin must still do before the TOML loads, one step per entry. */
  todo: string[];
  /** Keys of the original that were dropped, each with its reason. */
  dropped: { key: string; reason: string }[];
}

/** A TOML basic string for `s`. */
export function tomlString(s: string): string {
  // JSON's escapes are all valid in TOML basic strings; DEL must be escaped in TOML too.
  return JSON.stringify(s).replace(/\x7f/g, "\\u007F");
}

/** A TOML key: bare when it can be, quoted otherwise. */
function tomlKey(key: string): string {
  return /^[A-Za-z0-9_-]+$/.test(key) ? key : tomlString(key);
}

function comment(text: string, width = 98): string[] {
  const lines: string[] = [];
  for (const paragraph of text.split("\n")) {
    let line = "#";
    for (const word of paragraph.split(" ")) {
      if (line.length + 1 + word.length > width && line !== "#") {
        lines.push(line);
        line = "#";
      }
      line += " " + word;
    }
    lines.push(line);
  }
  return lines;
}

/** Validates values of one parsed file against what the keys mean, naming file:line:column. */
class Checker {
  constructor(readonly file: string) {}

  fail(at: PyValue | Assignment, key: string, problem: string): never {
    throw new MigrateError(`${this.file}:${at.pos.line}:${at.pos.column}: ${key}: ${problem}`);
  }

  str(v: PyValue, key: string, what = "a string"): string {
    if (v.type !== "str") this.fail(v, key, `expected ${what}, found ${describeValue(v)}`);
    if (!v.value.isWellFormed()) this.fail(v, key, "the string is not valid Unicode");
    return v.value;
  }

  path(v: PyValue, key: string): string {
    const s = this.str(v, key, "a file path (a string)");
    if (s === "") this.fail(v, key, "expected a file path, found an empty string");
    return s;
  }

  int(v: PyValue, key: string, min: number, max: number, what: string): number {
    if (v.type !== "int" || v.value < min || v.value > max) {
      this.fail(v, key, `expected ${what} (${min}-${max}), found ${describeValue(v)}`);
    }
    return v.value;
  }

  port(v: PyValue, key: string): number {
    return this.int(v, key, 1, 65535, "a port number");
  }

  pair(v: PyValue, key: string, what: string): [PyValue, PyValue] {
    if ((v.type !== "tuple" && v.type !== "list") || v.items.length !== 2) {
      this.fail(v, key, `expected ${what}, found ${describeValue(v)}`);
    }
    return [v.items[0], v.items[1]];
  }
}

function describeValue(v: PyValue): string {
  switch (v.type) {
    case "int":
    case "float":
      return `the number ${v.value}`;
    case "str":
      return `the string ${JSON.stringify(v.value)}`;
    case "bool":
      return v.value ? "True" : "False";
    case "none":
      return "None";
    case "tuple":
    case "list":
      return `a ${v.type} of ${v.items.length}`;
    case "dict":
      return `a dict of ${v.entries.length}`;
  }
}

/**
 * Converts an original NATadm config (client or server, told apart by its keys) into this
 * project's TOML. Throws {@link MigrateError} naming file:line:column for anything it cannot
 * convert faithfully.
 */
export function migrateConfig(text: string, file: string): Migration {
  const assignments = parsePythonConfig(text, file);
  const client = assignments.filter((a) => CLIENT_KEYS.includes(a.name));
  const server = assignments.filter((a) => SERVER_KEYS.includes(a.name));
  if (client.length && server.length) {
    const [c, s] = [client[0], server[0]];
    throw new MigrateError(
      `${file}:${s.pos.line}:${s.pos.column}: ${s.name} is a server key, but ${c.name} ` +
        `(${c.pos.line}:${c.pos.column}) is a client key: one file is either a client ` +
        `config (NATadm.conf) or a server config (NATadm_server.conf)`,
    );
  }
  if (!client.length && !server.length) {
    throw new MigrateError(
      `${file}: neither a client nor a server config of the original NATadm: expected client ` +
        `keys (${CLIENT_KEYS.join(", ")}) or server keys (${SERVER_KEYS.join(", ")})`,
    );
  }
  return client.length ? migrateClient(assignments, file) : migrateServer(assignments, file);
}

function header(file: string, kind: string): string[] {
  const base = file.split(/[\\/]/).pop();
  return [
    ...comment(
      `NATadm ${kind} config, converted by \`deno task migrate\` from ${base} (the original ` +
        `NATadm's ${kind} config).`,
    ),
  ];
}

function pathNote(paths: string[]): string[] {
  if (!paths.some((p) => !p.startsWith("/"))) return [];
  return comment(
    "Relative paths are resolved against the directory of this file (the original resolved " +
      "them against its working directory): keep them if this file sits where the original " +
      "ran, or adjust them.",
  );
}

/**
 * Appends to `lines` each assignment whose key is not `known`, commented out, with why it was
 * dropped. Appended line by line: a hostile file's lines are too many to spread as arguments.
 */
function addDropped(
  lines: string[],
  assignments: Assignment[],
  known: string[],
  kind: string,
  dropped: Migration["dropped"],
): void {
  for (const a of assignments) {
    if (known.includes(a.name)) continue;
    // Own keys only: a key named constructor or __proto__ is as unknown as any other.
    const reason = Object.hasOwn(DROPPED, a.name) ? DROPPED[a.name] : `${a.name} is not a key ` +
      `of the original NATadm's ${kind} config, so it had no effect there either.`;
    dropped.push({ key: a.name, reason });
    lines.push("", `# Dropped (line ${a.pos.line}):`);
    for (const line of a.text.split(/\r?\n|\r/)) lines.push(`#   ${line}`);
    lines.push(...comment(reason));
  }
}

function migrateClient(assignments: Assignment[], file: string): Migration {
  const check: Checker = new Checker(file);
  const get = (key: string) => assignments.find((a) => a.name === key);
  const required = (key: string) => {
    const a = get(key);
    if (!a) {
      throw new MigrateError(`${file}: client config has no ${key}; the original needs it too`);
    }
    return a.value;
  };
  const nameValue = required("name");
  const name = check.str(nameValue, "name");
  const problem = checkName(name);
  if (problem) check.fail(nameValue, "name", `the client name ${problem}`);
  const [hostValue, portValue] = check.pair(required("remote"), "remote", "('host', port)");
  const host = check.str(hostValue, "remote", "a host name (a string) first");
  if (host === "") check.fail(hostValue, "remote", "the host name is empty");
  const port = check.port(portValue, "remote");
  const cafile = check.path(required("cafile"), "cafile");
  const lines = [
    ...header(file, "client"),
    ...pathNote([cafile]),
    "",
    `name = ${tomlString(name)}`,
    `remote = [${tomlString(host)}, ${port}]`,
    `cafile = ${tomlString(cafile)}`,
  ];
  const interval = get("interval");
  if (interval) {
    const v = interval.value;
    if (v.type === "float") {
      check.fail(v, "interval", `NATadm needs whole seconds, found ${v.value}; round it`);
    }
    lines.push(`interval = ${check.int(v, "interval", 1, 3600, "whole seconds")}`);
  }
  const infinite = get("infinite");
  if (infinite) {
    const v = infinite.value;
    if (v.type !== "bool") {
      check.fail(v, "infinite", `expected True or False, found ${describeValue(v)}`);
    }
    lines.push(`infinite = ${v.value}`);
  }
  const dropped: Migration["dropped"] = [];
  addDropped(lines, assignments, CLIENT_KEYS, "client", dropped);
  const todo = [
    "Make this client's key, on the client machine, next to this file: " +
    "deno task keygen --out client.key.pem",
    `In this file, uncomment the line key = "client.key.pem" (the path is relative to this file).`,
    `In the server's config, add [clients.${tomlKey(name)}] with the key = "..." line that ` +
    `keygen printed.`,
  ];
  lines.push(
    "",
    ...comment(
      "TO ADD (required): this client's private key. NATadm clients prove their name with an " +
        "Ed25519 key, which the original had no equivalent of. On this machine, in this " +
        "file's directory, run",
    ),
    "#   deno task keygen --out client.key.pem",
    ...comment(
      'then uncomment the key line at the end, and put the `key = "..."` line keygen prints ' +
        "into the server's config, in this client's table:",
    ),
    `#   [clients.${tomlKey(name)}]`,
    `# key = "client.key.pem"`,
  );
  return { kind: "client", toml: lines.join("\n") + "\n", todo, dropped };
}

function migrateServer(assignments: Assignment[], file: string): Migration {
  const check: Checker = new Checker(file);
  const get = (key: string) => assignments.find((a) => a.name === key);
  const required = (key: string) => {
    const a = get(key);
    if (!a) {
      throw new MigrateError(`${file}: server config has no ${key}; the original needs it too`);
    }
    return a.value;
  };
  const communicationPort = check.port(required("communication_port"), "communication_port");
  const [certValue, keyValue] = check.pair(
    required("communication_server_certificate"),
    "communication_server_certificate",
    "('certificate.pem', 'key.pem')",
  );
  const cert = check.path(certValue, "communication_server_certificate");
  const key = check.path(keyValue, "communication_server_certificate");

  const services: { port: number; name: string; target: number }[] = [];
  const servicesAssignment = get("services");
  if (servicesAssignment) {
    const v = servicesAssignment.value;
    if (v.type !== "dict") {
      check.fail(
        v,
        "services",
        `expected a dict {port: {'name': ..., 'port': ...}}, found ${describeValue(v)}`,
      );
    }
    for (const { key: portKey, value: entry } of v.entries) {
      const port = check.port(portKey, "services");
      const at = `services[${port}]`;
      if (port === communicationPort) {
        check.fail(portKey, at, `port ${port} is also communication_port; pick another`);
      }
      if (entry.type !== "dict") {
        check.fail(
          entry,
          at,
          `expected a dict {'name': ..., 'port': ...}, found ${describeValue(entry)}`,
        );
      }
      let name: string | undefined;
      let nameField: PyValue | undefined;
      let target: number | undefined;
      for (const field of entry.entries) {
        const fieldName = check.str(field.key, at, "a field name: 'name' (or 'client') or 'port'");
        if (fieldName === "name" || fieldName === "client") {
          if (nameField) {
            check.fail(field.key, at, "has both 'name' and 'client'; they mean the same, keep one");
          }
          nameField = field.value;
          name = check.str(field.value, `${at}['${fieldName}']`, "a client name (a string)");
          const problem = checkName(name);
          if (problem) {
            check.fail(field.value, `${at}['${fieldName}']`, `the client name ${problem}`);
          }
        } else if (fieldName === "port") {
          target = check.port(field.value, `${at}['port']`);
        } else {
          check.fail(
            field.key,
            at,
            `unknown field '${fieldName}' (expected 'name' or 'client', and 'port')`,
          );
        }
      }
      if (name === undefined) {
        check.fail(entry, at, "has no 'name' (or 'client'): which client serves it?");
      }
      if (target === undefined) {
        check.fail(entry, at, "has no 'port': the port on the client machine");
      }
      services.push({ port, name, target });
    }
  }
  const clientNames = [...new Set(services.map((s) => s.name))];

  const lines = [
    ...header(file, "server"),
    ...pathNote([cert, key]),
    "",
    `communication_port = ${communicationPort}`,
    `communication_server_certificate = [${tomlString(cert)}, ${tomlString(key)}]`,
  ];
  const dropped: Migration["dropped"] = [];
  addDropped(lines, assignments, SERVER_KEYS.slice(0, 3), "server", dropped);
  const todo = clientNames.length === 0
    ? [
      `Add a [clients."NAME"] table with each client's key, and a [services.PORT] table ` +
      "for each service.",
    ]
    : [
      ...clientNames.map((n) =>
        `On client ${JSON.stringify(n)}: deno task keygen --out client.key.pem; then paste the ` +
        `key = "..." line it prints under [clients.${tomlKey(n)}] in this file.`
      ),
    ];
  lines.push("");
  if (clientNames.length) {
    lines.push(
      ...comment(
        "TO ADD (required): each client's public key. NATadm clients prove their name with an " +
          "Ed25519 key, which the original had no equivalent of. On each client machine run",
      ),
      "#   deno task keygen --out client.key.pem",
      ...comment(
        `and paste the \`key = "..."\` line it prints in place of the commented line in that ` +
          `client's table below.`,
      ),
    );
    for (const n of clientNames) {
      lines.push(
        "",
        `[clients.${tomlKey(n)}]`,
        `# key = "PASTE the line \`deno task keygen\` printed on ${n}"`,
      );
    }
  } else {
    lines.push('# No services, so no clients: add [clients."NAME"] and [services.PORT] tables.');
  }
  for (const s of services) {
    lines.push("", `[services.${s.port}]`, `name = ${tomlString(s.name)}`, `port = ${s.target}`);
  }
  return { kind: "server", toml: lines.join("\n") + "\n", todo, dropped };
}
