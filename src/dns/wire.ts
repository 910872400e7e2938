import ipaddr from 'ipaddr.js'
/**
 * The DNS wire format, as much as an authoritative server for one small zone
 * needs. The hot path never decodes a whole message: it reads the header, the
 * one question and an optional EDNS OPT record, looks the question up in a
 * table of pre-encoded answers, and copies bytes.
 */
export const TYPE = { A: 1, NS: 2, CNAME: 5, SOA: 6, PTR: 12, HINFO: 13, TXT: 16, AAAA: 28, SRV: 33, OPT: 41, ANY: 255 } as const
/**
 * BADVERS is an extended RCODE (RFC 6891): its low 4 bits go in the header,
 * the upper 8 in the OPT record's TTL, so it can only be sent with an OPT record.
 */
export const RCODE = { NOERROR: 0, FORMERR: 1, SERVFAIL: 2, NXDOMAIN: 3, NOTIMP: 4, REFUSED: 5, BADVERS: 16 } as const
export const CLASS_IN = 1
export const DEFAULT_DNS_PORT = 53

export interface Question {
  /** The question name as sent, lower-cased, dotted, without the trailing dot ("" for the root). */
  name: string
  type: number
  class: number
  /** Offset just past the question section. */
  end: number
  opcode: number
  rd: boolean
  /** The client's EDNS UDP size, or undefined without EDNS. */
  ednsSize?: number
  /** The EDNS version the client asked for (0 without EDNS); we speak only 0. */
  ednsVersion: number
  /** The OPT record's DO bit (RFC 3225), which the reply's OPT record echoes. */
  dnssecOk: boolean
}

export class FormError extends Error {
  override name = 'FormError'
}

/** Reads the header, the single question and an OPT record. Throws FormError on anything malformed. */
export function parseQuery(msg: Uint8Array): Question {
  if (msg.length < 12) throw new FormError('short header')
  const flags = (msg[2] ?? 0) * 256 + (msg[3] ?? 0)
  if (flags & 0x8000) throw new FormError('not a query')
  const qd = (msg[4] ?? 0) * 256 + (msg[5] ?? 0)
  const an = (msg[6] ?? 0) * 256 + (msg[7] ?? 0)
  const ns = (msg[8] ?? 0) * 256 + (msg[9] ?? 0)
  const ar = (msg[10] ?? 0) * 256 + (msg[11] ?? 0)
  if (qd !== 1 || an !== 0 || ns !== 0 || ar > 1) throw new FormError('expected one question')
  let p = 12
  const labels: string[] = []
  let total = 0
  for (;;) {
    const len = msg[p]
    if (len === undefined) throw new FormError('name runs past the end')
    p++
    if (len === 0) break
    // No compression in a question: it has nothing earlier to point at, and pointers invite loops.
    if (len > 63) throw new FormError('bad label length')
    if (p + len > msg.length) throw new FormError('label runs past the end')
    total += len + 1
    if (total > 255) throw new FormError('name too long')
    let label = ''
    for (let i = p; i < p + len; i++) {
      const c = msg[i] as number
      // A "." byte inside one label must not read as a label boundary ("laptop.mesh" as one
      // label is not laptop.mesh): it becomes NUL, which no name of ours contains.
      label += String.fromCharCode(c >= 65 && c <= 90 ? c + 32 : c === 46 ? 0 : c)
    }
    labels.push(label)
    p += len
  }
  if (p + 4 > msg.length) throw new FormError('question runs past the end')
  const type = (msg[p] as number) * 256 + (msg[p + 1] as number)
  const klass = (msg[p + 2] as number) * 256 + (msg[p + 3] as number)
  const end = p + 4
  let ednsSize: number | undefined
  let ednsVersion = 0
  let dnssecOk = false
  if (ar === 1) {
    // Only an OPT record may follow: root name, type 41, class = UDP size.
    if (end + 11 > msg.length || msg[end] !== 0) throw new FormError('bad additional record')
    const rtype = (msg[end + 1] as number) * 256 + (msg[end + 2] as number)
    if (rtype !== TYPE.OPT) throw new FormError('additional record is not OPT')
    ednsSize = Math.max(512, (msg[end + 3] as number) * 256 + (msg[end + 4] as number))
    // The TTL field holds the extended RCODE (ignored in a query), the version and the flags.
    ednsVersion = msg[end + 6] as number
    dnssecOk = ((msg[end + 7] as number) & 0x80) !== 0
    const rdlen = (msg[end + 9] as number) * 256 + (msg[end + 10] as number)
    if (end + 11 + rdlen > msg.length) throw new FormError('OPT runs past the end')
  }
  return { name: labels.join('.'), type, class: klass, end, opcode: (flags >> 11) & 0xf, rd: (flags & 0x0100) !== 0, ednsSize, ednsVersion, dnssecOk }
}

/** Encodes a dotted name as labels (no compression). */
export function encodeName(name: string): Buffer {
  const parts = name === '' ? [] : name.split('.')
  const out: number[] = []
  for (const p of parts) {
    const b = Buffer.from(p, 'latin1')
    if (b.length === 0 || b.length > 63) throw new Error(`bad label in ${name}`)
    out.push(b.length, ...b)
  }
  out.push(0)
  return Buffer.from(out)
}

export interface RR {
  /** Owner name; `null` means "the question name" (a 2-byte pointer to offset 12). */
  name: string | null
  type: number
  ttl: number
  data: Buffer
}

export function encodeRR(rr: RR): Buffer {
  const owner = rr.name === null ? Buffer.from([0xc0, 0x0c]) : encodeName(rr.name)
  const head = Buffer.alloc(10)
  head.writeUInt16BE(rr.type, 0)
  head.writeUInt16BE(CLASS_IN, 2)
  head.writeUInt32BE(rr.ttl, 4)
  head.writeUInt16BE(rr.data.length, 8)
  return Buffer.concat([owner, head, rr.data])
}

export const rdata = {
  a: (ip: string) => Buffer.from(ip.split('.').map(Number)),
  aaaa: (ip: string) => Buffer.from(ipaddr.IPv6.parse(ip).toByteArray()),
  name: (n: string) => encodeName(n),
  txt: (strings: string[]) => Buffer.concat(strings.map((s) => Buffer.concat([Buffer.from([Math.min(255, Buffer.byteLength(s))]), Buffer.from(s).subarray(0, 255)]))),
  srv: (priority: number, weight: number, port: number, target: string) => {
    const b = Buffer.alloc(6)
    b.writeUInt16BE(priority, 0)
    b.writeUInt16BE(weight, 2)
    b.writeUInt16BE(port, 4)
    return Buffer.concat([b, encodeName(target)])
  },
  soa: (mname: string, rname: string, serial: number, refresh: number, retry: number, expire: number, minimum: number) => {
    const nums = Buffer.alloc(20)
    ;[serial, refresh, retry, expire, minimum].forEach((v, i) => nums.writeUInt32BE(v >>> 0, i * 4))
    return Buffer.concat([encodeName(mname), encodeName(rname), nums])
  },
  hinfo: (cpu: string, os: string) => rdata.txt([cpu, os]),
}

/** A pre-encoded answer: everything after the question, plus the counts and rcode for the header. */
export interface Prepared {
  rcode: number
  an: number
  ns: number
  ar: number
  body: Buffer
}

export function prepare(rcode: number, answer: RR[], authority: RR[] = [], additional: RR[] = []): Prepared {
  return { rcode, an: answer.length, ns: authority.length, ar: additional.length, body: Buffer.concat([...answer, ...authority, ...additional].map(encodeRR)) }
}

/** The OPT record we send back to EDNS clients: our UDP size, version 0, no options. */
export const OPT_RR = Buffer.from([0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 0])
export const OUR_EDNS_SIZE = 1232

/**
 * Writes our OPT record at `o`, with the upper bits of an extended RCODE and
 * the query's DO bit copied back (RFC 3225). In place, so a reply still costs
 * one allocation.
 */
function writeOpt(out: Buffer, o: number, rcode: number, dnssecOk: boolean): void {
  OPT_RR.copy(out, o)
  out[o + 5] = rcode >> 4
  out[o + 7] = dnssecOk ? 0x80 : 0
}

/** Writes the reply's header and the question at `at`: the query's ID, opcode, RD bit and question bytes, AA set. */
function writeHead(out: Buffer, at: number, query: Uint8Array, q: Question, p: Prepared, truncated: boolean): void {
  out[at] = query[0] as number
  out[at + 1] = query[1] as number
  out[at + 2] = 0x80 | (q.opcode << 3) | 0x04 | (truncated ? 0x02 : 0) | (q.rd ? 1 : 0)
  out[at + 3] = p.rcode
  out.writeUInt16BE(1, at + 4)
  out.writeUInt16BE(truncated ? 0 : p.an, at + 6)
  out.writeUInt16BE(truncated ? 0 : p.ns, at + 8)
  out.writeUInt16BE((truncated ? 0 : p.ar) + (q.ednsSize !== undefined ? 1 : 0), at + 10)
  out.set(query.subarray(12, q.end), at + 12)
}

/**
 * Builds the reply: header and question, then the prepared sections. Over
 * UDP, an answer longer than the client can take is cut to the question with
 * TC set, so the client retries over TCP.
 */
export function reply(query: Uint8Array, q: Question, p: Prepared, limit: number): Buffer {
  const withOpt = q.ednsSize !== undefined
  const full = 12 + (q.end - 12) + p.body.length + (withOpt ? OPT_RR.length : 0)
  const truncated = full > limit
  const size = truncated ? q.end + (withOpt ? OPT_RR.length : 0) : full
  const out = Buffer.allocUnsafe(size)
  writeHead(out, 0, query, q, p, truncated)
  let o = q.end
  if (!truncated) {
    p.body.copy(out, o)
    o += p.body.length
  }
  if (withOpt) writeOpt(out, o, p.rcode, q.dnssecOk)
  return out
}

/** A 2-byte TCP length prefix. */
export function lengthPrefix(n: number): Buffer {
  const head = Buffer.allocUnsafe(2)
  head.writeUInt16BE(n)
  return head
}

/**
 * The reply `reply` would build, framed for TCP, as pieces to write together:
 * the length prefix with header and question in one new buffer, then the
 * zone's own pre-encoded records, never copied, then the OPT record. A
 * connection's write queue then holds references to answers the zone keeps
 * anyway, not a copy of each. The zone keeps every answer within 64 KiB; one
 * that isn't is copied and cut the way `reply` cuts it.
 */
export function tcpReply(query: Uint8Array, q: Question, p: Prepared): Buffer[] {
  const withOpt = q.ednsSize !== undefined
  const full = q.end + p.body.length + (withOpt ? OPT_RR.length : 0)
  if (full > 65535) {
    const out = reply(query, q, p, 65535)
    return [lengthPrefix(out.length), out]
  }
  const head = Buffer.allocUnsafe(2 + q.end + (withOpt ? OPT_RR.length : 0))
  head.writeUInt16BE(full, 0)
  writeHead(head, 2, query, q, p, false)
  if (!withOpt) return [head, p.body]
  // The OPT record goes last: write it into the same allocation and send it as a view of it.
  writeOpt(head, 2 + q.end, p.rcode, q.dnssecOk)
  return [head.subarray(0, 2 + q.end), p.body, head.subarray(2 + q.end)]
}

/**
 * An error reply (FORMERR, REFUSED, NOTIMP, SERVFAIL, BADVERS) that echoes
 * whatever of the question could be read. A query that parsed with EDNS gets
 * our OPT record too, which carries the upper bits of an extended RCODE; a
 * FORMERR for an unreadable packet is the bare header.
 */
export function errorReply(query: Uint8Array, rcode: number, q?: Question): Buffer {
  if (query.length < 12) return Buffer.alloc(0)
  const end = q ? q.end : 12
  const withOpt = q?.ednsSize !== undefined
  const out = Buffer.alloc(end + (withOpt ? OPT_RR.length : 0))
  out[0] = query[0] as number
  out[1] = query[1] as number
  out[2] = 0x80 | ((query[2] ?? 0) & 0x79)
  out[3] = rcode & 0x0f
  out.writeUInt16BE(q ? 1 : 0, 4)
  if (q) out.set(query.subarray(12, q.end), 12)
  if (q && withOpt) {
    out.writeUInt16BE(1, 10)
    writeOpt(out, end, rcode, q.dnssecOk)
  }
  return out
}

/** Builds a query for one name and type, with an EDNS OPT record unless `edns` is 0. */
export function buildQuery(name: string, type: number, opts: { id?: number; edns?: number; rd?: boolean } = {}): Buffer {
  const edns = opts.edns ?? 1232
  const head = Buffer.alloc(12)
  head.writeUInt16BE(opts.id ?? Math.floor(Math.random() * 0x10000), 0)
  head[2] = opts.rd === false ? 0 : 1
  head.writeUInt16BE(1, 4)
  head.writeUInt16BE(edns ? 1 : 0, 10)
  const tail = Buffer.alloc(4)
  tail.writeUInt16BE(type, 0)
  tail.writeUInt16BE(CLASS_IN, 2)
  const opt = edns ? Buffer.from([0, 0, 41, edns >> 8, edns & 0xff, 0, 0, 0, 0, 0, 0]) : Buffer.alloc(0)
  return Buffer.concat([head, encodeName(name.replace(/\.$/, '')), tail, opt])
}

export interface DecodedRR {
  name: string
  type: number
  class: number
  ttl: number
  /** A short presentation form: "10.0.0.1", "laptop.mesh.", "10 0 2049 nfs.mesh.", "\"a\" \"b\"". */
  data: string
}

export interface DecodedMessage {
  id: number
  flags: { qr: boolean; aa: boolean; tc: boolean; rd: boolean; ra: boolean }
  rcode: number
  question?: { name: string; type: number }
  answer: DecodedRR[]
  authority: DecodedRR[]
  additional: DecodedRR[]
}

/** Bounds checks and name reading over one whole message, for decodeMessage. */
function messageReader(buf: Buffer) {
  const need = (p: number, n: number) => {
    if (p + n > buf.length) throw new FormError('message runs past the end')
  }
  const readName = (start: number): { name: string; end: number } => {
    const labels: string[] = []
    let p = start
    let end = -1
    let limit = start
    for (;;) {
      need(p, 1)
      const len = buf[p] as number
      if ((len & 0xc0) === 0xc0) {
        need(p, 2)
        const target = ((len & 0x3f) << 8) | (buf[p + 1] as number)
        if (target >= limit) throw new FormError('compression pointer does not point backwards')
        if (end < 0) end = p + 2
        limit = target
        p = target
        continue
      }
      if (len > 63) throw new FormError('bad label length')
      p++
      if (len === 0) break
      need(p, len)
      labels.push(buf.toString('latin1', p, p + len))
      p += len
      if (labels.join('.').length > 255) throw new FormError('name too long')
    }
    return { name: labels.join('.'), end: end < 0 ? p : end }
  }
  return { buf, need, readName }
}

/** One record's data in presentation form (see DecodedRR.data). */
function present(r: ReturnType<typeof messageReader>, type: number, p: number, len: number): string {
  const { buf, need, readName } = r
  const rd = buf.subarray(p, p + len)
  switch (type) {
    case TYPE.A:
      return len === 4 ? [...rd].join('.') : rd.toString('hex')
    case TYPE.AAAA:
      return len === 16 ? ipaddr.fromByteArray([...rd]).toString() : rd.toString('hex')
    case TYPE.NS:
    case TYPE.CNAME:
    case TYPE.PTR:
      return `${readName(p).name}.`
    case TYPE.SRV:
      need(p, 6)
      return `${buf.readUInt16BE(p)} ${buf.readUInt16BE(p + 2)} ${buf.readUInt16BE(p + 4)} ${readName(p + 6).name}.`
    case TYPE.SOA: {
      const m = readName(p)
      const rname = readName(m.end)
      need(rname.end, 20)
      return `${m.name}. ${rname.name}. ${[0, 4, 8, 12, 16].map((o) => buf.readUInt32BE(rname.end + o)).join(' ')}`
    }
    case TYPE.TXT:
    case TYPE.HINFO: {
      const parts: string[] = []
      for (let i = 0; i < rd.length;) {
        const n = rd[i] as number
        parts.push(JSON.stringify(rd.toString('utf8', i + 1, i + 1 + n)))
        i += 1 + n
      }
      return parts.join(' ')
    }
    default:
      return rd.toString('hex')
  }
}

/**
 * Decodes a whole message, for the `resolve` command and the tests. Unlike the
 * server's parser it follows compression pointers, each only backwards, so a
 * pointer loop ends in an error instead of a hang.
 */
export function decodeMessage(msg: Uint8Array): DecodedMessage {
  const buf = Buffer.from(msg.buffer, msg.byteOffset, msg.byteLength)
  if (buf.length < 12) throw new FormError('short header')
  const reader = messageReader(buf)
  const { need, readName } = reader
  const qd = buf.readUInt16BE(4)
  const counts = [buf.readUInt16BE(6), buf.readUInt16BE(8), buf.readUInt16BE(10)] as const
  let p = 12
  let question: DecodedMessage['question']
  for (let i = 0; i < qd; i++) {
    const n = readName(p)
    need(n.end, 4)
    if (i === 0) question = { name: n.name, type: buf.readUInt16BE(n.end) }
    p = n.end + 4
  }
  const sections: DecodedRR[][] = [[], [], []]
  counts.forEach((count, s) => {
    for (let i = 0; i < count; i++) {
      const n = readName(p)
      need(n.end, 10)
      const type = buf.readUInt16BE(n.end)
      const len = buf.readUInt16BE(n.end + 8)
      need(n.end + 10, len)
      ;(sections[s] as DecodedRR[]).push({
        name: n.name,
        type,
        class: buf.readUInt16BE(n.end + 2),
        ttl: buf.readUInt32BE(n.end + 4),
        data: type === TYPE.OPT ? '' : present(reader, type, n.end + 10, len),
      })
      p = n.end + 10 + len
    }
  })
  const f = buf.readUInt16BE(2)
  return {
    id: buf.readUInt16BE(0),
    flags: { qr: (f & 0x8000) !== 0, aa: (f & 0x0400) !== 0, tc: (f & 0x0200) !== 0, rd: (f & 0x0100) !== 0, ra: (f & 0x0080) !== 0 },
    rcode: f & 0x0f,
    question,
    answer: sections[0] ?? [],
    authority: sections[1] ?? [],
    additional: sections[2] ?? [],
  }
}

export const typeName = (t: number): string => Object.entries(TYPE).find(([, v]) => v === t)?.[0] ?? `TYPE${t}`
export const rcodeName = (r: number): string => Object.entries(RCODE).find(([, v]) => v === r)?.[0] ?? `RCODE${r}`
