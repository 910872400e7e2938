import { open } from 'node:fs/promises'
import { isIP } from 'node:net'
import { performance } from 'node:perf_hooks'
import { isTincName } from './names.ts'
import { findTincd, inTincdLane } from './signal.ts'

/**
 * tincd 1.0 has no control socket: the only way to see its view of the mesh
 * is to send it SIGUSR1/SIGUSR2 and read what it writes to its log. That log
 * is also written by everything else tincd does, so the parser below trusts
 * nothing: every section must be closed by its End line, every detail line
 * must match tincd's printf format exactly, and every field is validated.
 */

export interface DumpNode {
  name: string
  address?: string
  port?: number
  status: number
  reachable: boolean
  nexthop?: string
  via?: string
  pmtu?: number
  /** The smallest MTU a UDP probe confirmed: 0 while no UDP packet has come back, when tinc falls back to TCP through nexthop. */
  minPmtu?: number
  options?: number
}

export interface DumpEdge {
  from: string
  to: string
  address?: string
  port?: number
  weight: number
  options?: number
}

export interface DumpSubnet {
  subnet: string
  weight?: number
  owner: string
}

export interface DumpConnection {
  name: string
  address?: string
  port?: number
  status: number
  options?: number
  outbuf?: string
}

export interface TincDump {
  /** When the newest section was read (the log line's timestamp parsed as local time, or undefined). */
  at?: Date
  bytesIn?: number
  bytesOut?: number
  nodes?: DumpNode[]
  edges?: DumpEdge[]
  subnets?: DumpSubnet[]
  connections?: DumpConnection[]
  /** Lines inside a section that did not parse. */
  skipped: number
}

export interface DumpReaderOptions {
  logFile: string
  pidFile: string
  /** How long to wait for tincd to finish writing both dumps. Default 2000. */
  timeoutMs?: number
  /** Results younger than this are served from cache instead of signalling again. Default 1000. */
  minIntervalMs?: number
  /** For tests: replaces process.kill. */
  signal?: (pid: number, sig: NodeJS.Signals) => void
  /** For tests: replaces reading /proc/<pid>/comm. */
  comm?: (pid: number) => string | undefined
}

export type DumpResult = { state: 'up'; dump: TincDump; pid: number } | { state: 'down' | 'timeout'; reason: string; dump?: TincDump }

// tinc 1.0's file logger: "%Y-%m-%d %H:%M:%S" then "<ident>[<pid>]: ", ident being "tinc" or "tinc.<netname>".
const PREFIX_RE = /^(\d{4})-(\d{2})-(\d{2}) (\d{2}):(\d{2}):(\d{2}) tinc(?:\.[^\s[\]]{1,64})?\[\d{1,10}\]: (.*)$/

// Detail lines come from fixed printf formats (node.c, edge.c, subnet.c,
// connection.c in tinc 1.0.36). "at %s" is sockaddr2hostname(), which is
// "<addr> port <port>" or a placeholder such as "unknown port unknown".
const NODE_RE = /^ (\S+) at (.+?) cipher (\d+) digest (\d+) maclength (\d+) compression (\d+) options ([0-9a-fA-F]+) status ([0-9a-fA-F]+) nexthop (\S+) via (\S+) pmtu (\d+) \(min (\d+) max (\d+)\)$/
const EDGE_RE = /^ (\S+) to (\S+) at (.+?) options ([0-9a-fA-F]+) weight (-?\d+)$/
const SUBNET_RE = /^ ([^\s#]+)(?:#(-?\d+))? owner (\S+)$/
const CONN_RE = /^ (\S+) at (.+?) options ([0-9a-fA-F]+) socket (-?\d+) status ([0-9a-fA-F]+) outbuf (\d+\/\d+\/\d+)$/
const BYTES_IN_RE = /^ total bytes in: +(\d+)$/
const BYTES_OUT_RE = /^ total bytes out: +(\d+)$/
// tinc prints MAC subnets with %hx, so octets are not zero-padded.
const MAC_RE = /^[0-9a-fA-F]{1,2}(?::[0-9a-fA-F]{1,2}){5}$/

// Real detail lines are well under 300 characters; the cap keeps the lazy
// host pattern from doing quadratic work on a hostile or corrupted line.
const MAX_LINE = 4096

/** Bit 4 of tinc 1.0's node_status_t is "reachable". */
const STATUS_REACHABLE = 0x10

type Kind = 'stats' | 'nodes' | 'edges' | 'subnets' | 'connections'

// Maps, not object literals: a log line reading "constructor" must not find Object.prototype's.
const HEADERS = new Map<string, Kind>([
  ['Nodes:', 'nodes'],
  ['Edges:', 'edges'],
  ['Subnet list:', 'subnets'],
  ['Connections:', 'connections'],
])

const ENDS = new Map<string, Kind>([
  ['End of nodes.', 'nodes'],
  ['End of edges.', 'edges'],
  ['End of subnet list.', 'subnets'],
  ['End of connections.', 'connections'],
])

interface Section {
  kind: Kind
  /** Detail lines (text after the log prefix), parsed only if this section wins. */
  lines: string[]
  /** Lines seen inside the section that cannot be detail lines at all. */
  junk: number
  at?: Date
}

/** Parses log text; returns the LAST complete occurrence of each section. Never throws on bad input. */
export function parseDump(text: string): TincDump {
  const dump: TincDump = { skipped: 0 }
  if (typeof text !== 'string') return dump
  const done = new Map<Kind, Section>()
  let open: Section | undefined
  let newest: Section | undefined
  const close = (s: Section) => {
    done.set(s.kind, s)
    newest = s
    open = undefined
  }

  for (const raw of text.split('\n')) {
    const line = raw.endsWith('\r') ? raw.slice(0, -1) : raw
    const m = PREFIX_RE.exec(line)
    if (!m) {
      if (open) open.junk++
      continue
    }
    const body = m[7] ?? ''
    const header = HEADERS.get(body) ?? (/^Statistics for .{1,300}:$/.test(body) ? 'stats' : undefined)
    if (header) {
      // A header inside an open section means the old one was cut short
      // (tincd restarted mid-dump, or the log was truncated): drop it.
      open = { kind: header, lines: [], junk: 0 }
      continue
    }
    if (!open) continue
    if (ENDS.get(body) === open.kind) {
      open.at = localTime(m)
      close(open)
    } else if (body.startsWith(' ')) {
      open.lines.push(body)
      // Device statistics have no End line; tincd always writes "out" last.
      if (open.kind === 'stats' && body.startsWith(' total bytes out:')) {
        open.at = localTime(m)
        close(open)
      }
    } else {
      open.junk++
    }
  }

  for (const s of done.values()) {
    dump.skipped += s.junk
    if (s.kind === 'stats') {
      for (const l of s.lines) {
        const inM = BYTES_IN_RE.exec(l)
        const outM = BYTES_OUT_RE.exec(l)
        const n = Number((inM ?? outM)?.[1])
        if (!Number.isSafeInteger(n)) dump.skipped++
        else if (inM) dump.bytesIn = n
        else dump.bytesOut = n
      }
      continue
    }
    const parse = LINE_PARSERS[s.kind]
    const items: unknown[] = []
    for (const l of s.lines) {
      const item = l.length <= MAX_LINE ? parse(l) : undefined
      if (item) items.push(item)
      else dump.skipped++
    }
    // The casts are safe: each array is filled only by its own kind's parser.
    if (s.kind === 'nodes') dump.nodes = items as DumpNode[]
    else if (s.kind === 'edges') dump.edges = items as DumpEdge[]
    else if (s.kind === 'subnets') dump.subnets = items as DumpSubnet[]
    else dump.connections = items as DumpConnection[]
  }
  if (newest?.at) dump.at = newest.at
  return dump
}

const LINE_PARSERS: Record<Exclude<Kind, 'stats'>, (line: string) => object | undefined> = {
  nodes: parseNodeLine,
  edges: parseEdgeLine,
  subnets: parseSubnetLine,
  connections: parseConnectionLine,
}

function parseNodeLine(line: string): DumpNode | undefined {
  const m = NODE_RE.exec(line)
  if (!m) return undefined
  const [, name, host, cipher, digest, maclength, compression, options, status, nexthop, via, pmtu, minmtu, maxmtu] = m
  const where = parseHost(host)
  const st = hex(status)
  const opts = hex(options)
  const hop = optionalName(nexthop)
  const relay = optionalName(via)
  const numbers = [cipher, digest, maclength, compression, pmtu, minmtu, maxmtu].map(int)
  if (!isTincName(name) || !where || st === undefined || opts === undefined || hop === null || relay === null) return undefined
  if (numbers.some((n) => n === undefined)) return undefined
  return compact({ name, ...where, status: st, reachable: (st & STATUS_REACHABLE) !== 0, nexthop: hop, via: relay, pmtu: int(pmtu), minPmtu: int(minmtu), options: opts })
}

function parseEdgeLine(line: string): DumpEdge | undefined {
  const m = EDGE_RE.exec(line)
  if (!m) return undefined
  const [, from, to, host, options, weight] = m
  const where = parseHost(host)
  const opts = hex(options)
  const w = int(weight)
  if (!isTincName(from) || !isTincName(to) || !where || opts === undefined || w === undefined) return undefined
  return { from, to, ...where, weight: w, options: opts }
}

function parseSubnetLine(line: string): DumpSubnet | undefined {
  const m = SUBNET_RE.exec(line)
  if (!m) return undefined
  const [, subnet, weight, owner] = m
  const w = weight === undefined ? undefined : int(weight)
  if (!subnet || !isSubnet(subnet) || (weight !== undefined && w === undefined)) return undefined
  if (owner !== '(broadcast)' && !isTincName(owner)) return undefined
  return compact({ subnet, weight: w, owner })
}

function parseConnectionLine(line: string): DumpConnection | undefined {
  const m = CONN_RE.exec(line)
  if (!m) return undefined
  const [, name, host, options, socket, status, outbuf] = m
  const where = parseHost(host)
  const opts = hex(options)
  const st = hex(status)
  // Connections still authenticating are listed as "<unknown>"; they are not peers yet.
  if (!isTincName(name) || !where || opts === undefined || st === undefined || int(socket) === undefined) return undefined
  if (outbuf?.split('/').some((n) => int(n) === undefined)) return undefined
  return { name, ...where, status: st, options: opts, outbuf }
}

/**
 * "<addr> port <port>" or a bare placeholder. Anything that is not an IP
 * literal ("MYSELF", "unknown") only means "no address", but a port that is
 * neither "unknown" nor 0..65535 means the line is not what tincd wrote.
 */
function parseHost(host: string | undefined): { address?: string; port?: number } | undefined {
  if (host === undefined) return undefined
  const m = /^(\S+) port (\S+)$/.exec(host)
  if (!m) return /^\S+$/.test(host) ? {} : undefined
  const [, addr = '', portText = ''] = m
  const address = isIP(addr) ? addr : undefined
  if (portText === 'unknown') return compact({ address })
  const port = /^\d{1,5}$/.test(portText) ? Number(portText) : NaN
  if (!(port >= 0 && port <= 65535)) return undefined
  return compact({ address, port })
}

/** Drops absent fields, so results compare equal whether or not a field was ever set. */
function compact<T extends object>(o: T): T {
  for (const k of Object.keys(o) as (keyof T)[]) if (o[k] === undefined) delete o[k]
  return o
}

/** "-" is tinc's "none"; undefined is a valid absent name, null an invalid one. */
function optionalName(s: string | undefined): string | undefined | null {
  if (s === '-') return undefined
  return isTincName(s) ? s : null
}

function isSubnet(s: string): boolean {
  if (MAC_RE.test(s)) return true
  const parts = s.split('/')
  if (parts.length > 2) return false
  const family = isIP(parts[0] ?? '')
  if (!family) return false
  const prefix = parts[1]
  if (prefix === undefined) return true
  return /^\d{1,3}$/.test(prefix) && Number(prefix) <= (family === 4 ? 32 : 128)
}

function int(s: string | undefined): number | undefined {
  if (s === undefined || !/^-?\d{1,15}$/.test(s)) return undefined
  const n = Number(s)
  return Number.isSafeInteger(n) ? n : undefined
}

/** tinc prints options and status with %x/%04x: at most a 32-bit unsigned value. */
function hex(s: string | undefined): number | undefined {
  if (s === undefined || !/^[0-9a-fA-F]{1,8}$/.test(s)) return undefined
  return parseInt(s, 16)
}

/** tincd stamps lines with local time; a stamp that does not round-trip (month 13, a DST gap) is not trusted. */
function localTime(m: RegExpExecArray): Date | undefined {
  const [y, mo, d, h, mi, s] = m.slice(1, 7).map(Number) as [number, number, number, number, number, number]
  const date = new Date(y, mo - 1, d, h, mi, s)
  const ok = date.getFullYear() === y && date.getMonth() === mo - 1 && date.getDate() === d && date.getHours() === h && date.getMinutes() === mi && date.getSeconds() === s
  return ok ? date : undefined
}

const POLL_MS = 25
const MAX_READ = 1 << 20

/**
 * Returns a dump reader: each call signals tincd (USR2 for statistics, nodes,
 * edges and subnets; USR1 for connections) and reads the answer back from the
 * log. Every signal makes tincd write a few KiB to its log, so concurrent
 * callers share one read and results are reused for minIntervalMs. Never throws.
 */
export function dumpReader(opts: DumpReaderOptions): () => Promise<DumpResult> {
  const minInterval = opts.minIntervalMs ?? 1000
  let inflight: Promise<DumpResult> | undefined
  let last: { done: number; result: DumpResult } | undefined
  return () => {
    if (inflight) return inflight
    if (last && performance.now() - last.done < minInterval) return Promise.resolve(last.result)
    const run = readOnce(opts)
      .catch((err: unknown): DumpResult => ({ state: 'down', reason: `dump failed: ${String(err)}` }))
      .then((result) => {
        last = { done: performance.now(), result }
        inflight = undefined
        return result
      })
    inflight = run
    return run
  }
}

async function readOnce(opts: DumpReaderOptions): Promise<DumpResult> {
  const found = await findTincd(opts.pidFile, opts.comm)
  if (found.pid === undefined) return { state: 'down', reason: found.reason }
  return inTincdLane(opts.pidFile, () => dumpFrom(found.pid, opts))
}

/**
 * USR2 first, and USR1 only once USR2's answer has ended: tincd writes each
 * dump from inside its signal handler, and a signal landing mid-dump can
 * deadlock it (see signal.ts). When USR2's answer never ends, USR1 is not sent.
 */
async function dumpFrom(pid: number, opts: DumpReaderOptions): Promise<DumpResult> {
  const timeoutMs = opts.timeoutMs ?? 2000
  const send = opts.signal ?? ((p: number, sig: NodeJS.Signals) => void process.kill(p, sig))
  // Anything already in the log is an older dump (or another reader's): only
  // what tincd writes after our signal answers this request.
  let offset = (await fileSize(opts.logFile)) ?? 0
  try {
    send(pid, 'SIGUSR2')
  } catch (err) {
    return { state: 'down', reason: `cannot signal tincd ${pid}: ${(err as NodeJS.ErrnoException).code ?? String(err)}` }
  }

  const deadline = performance.now() + timeoutMs
  let seenSize = -1
  let dump: TincDump | undefined
  let sentUsr1 = false
  for (;;) {
    const win = await readWindow(opts.logFile, offset)
    if (win && win.size !== seenSize) {
      seenSize = win.size
      // The log shrank: it was rotated or truncated, so tincd's answer starts at 0.
      if (win.size < offset) offset = 0
      dump = parseDump(win.text)
      if (dump.subnets && dump.connections) return { state: 'up', dump, pid }
      if (dump.subnets && !sentUsr1) {
        sentUsr1 = true
        try {
          send(pid, 'SIGUSR1')
        } catch (err) {
          return { state: 'down', reason: `cannot signal tincd ${pid}: ${(err as NodeJS.ErrnoException).code ?? String(err)}` }
        }
      }
    }
    if (performance.now() >= deadline) {
      const reason = `tincd ${pid} wrote no complete dump to ${opts.logFile} within ${timeoutMs} ms`
      // Half a dump still tells the caller something (e.g. tincd is alive but USR1 was lost); nothing at all is not a dump.
      return dump && hasSections(dump) ? { state: 'timeout', reason, dump } : { state: 'timeout', reason }
    }
    await new Promise((r) => setTimeout(r, POLL_MS))
  }
}

function hasSections(d: TincDump): boolean {
  return [d.bytesIn, d.bytesOut, d.nodes, d.edges, d.subnets, d.connections].some((v) => v !== undefined)
}

async function fileSize(path: string): Promise<number | undefined> {
  try {
    const fh = await open(path, 'r')
    try {
      return (await fh.stat()).size
    } finally {
      await fh.close()
    }
  } catch {
    return undefined
  }
}

/**
 * The log from `offset` on (from 0 if the file shrank below it), at most its
 * last MAX_READ bytes, cut after the last newline so a line tincd is still
 * writing is never parsed half-done.
 */
async function readWindow(path: string, offset: number): Promise<{ size: number; text: string } | undefined> {
  try {
    const fh = await open(path, 'r')
    try {
      const { size } = await fh.stat()
      const from = Math.max(size < offset ? 0 : offset, size - MAX_READ)
      const buf = Buffer.alloc(size - from)
      const { bytesRead } = await fh.read(buf, 0, buf.length, from)
      const text = buf.subarray(0, bytesRead).toString('utf8')
      return { size, text: text.slice(0, text.lastIndexOf('\n') + 1) }
    } finally {
      await fh.close()
    }
  } catch {
    return undefined
  }
}
