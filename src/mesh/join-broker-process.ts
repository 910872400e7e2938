/**
 * The join broker as its own process. `run` forks it with the join-server
 * token in its environment; it opens no socket that reads from the network.
 * It binds the join port, forks the front as an unprivileged user with an
 * empty environment, hands it the listening socket (closing its own copy, so
 * it never accepts a connection itself), and answers the front's questions.
 * A front that dies is replaced on a fresh socket.
 */
import { siblingModule } from '../util/proc.ts'
import { fork, type ChildProcess } from 'node:child_process'
import { createServer } from 'node:net'
import { aclsEnabled } from '../consul/acl.ts'
import { createConsulClient } from '../consul/client.ts'
import { createLogger } from '../log.ts'
import { listenOn } from '../util/listen.ts'
import { lookupUser } from '../util/users.ts'
import { createJoinBroker, type JoinBroker } from './join-broker.ts'
import { publishJoinEndpoints } from './join-endpoints.ts'
import { brokerConfigSchema, fromFrontSchema, type BrokerConfig, type FromBroker, type ToFront } from './join-ipc.ts'
import type { JoinStats } from './join-front.ts'
import { kvLayout } from './kv-layout.ts'
import { GENERIC_REFUSAL, STATUS_ERROR } from './join-wire.ts'

const log = createLogger({ fd: 1 }).child({ process: 'join-broker' })
const tell = (m: FromBroker) => process.send?.(m)
/** Redemptions in flight at once; more are refused, so a front can't queue unbounded work here. */
const MAX_IN_FLIGHT = 16

let closing = false
let front: ChildProcess | undefined
const totals: JoinStats = { served: 0, refused: 0, rateLimited: 0 }

function frontFile(): string {
  return siblingModule(import.meta.url, 'join-front-process')
}

/** The front's account: '' keeps ours; as non-root we can't switch and say so. */
function frontIdentity(user: string): { uid: number; gid: number } | undefined {
  if (user === '' || process.getuid?.() !== 0) {
    log.warn({ user: user || '(none)' }, "the join front runs as the daemon's own user; run as root with --join-user to separate it")
    return undefined
  }
  const id = lookupUser(user)
  if (!id) throw Object.assign(new Error(`no such user "${user}" for the join front (--join-user)`), { code: 'JOIN_USER' })
  if (id.uid === 0) log.warn({ user }, 'the join front runs as root (--join-user); it holds no token, but a bug in it would be a bug as root')
  return id
}

function frontFailed(err: unknown, id: { uid: number } | undefined): Error {
  const hint = id ? ` as uid ${id.uid} (needs CAP_SETUID and CAP_SETGID; under systemd, in CapabilityBoundingSet; or --join-user '' to keep the daemon's user)` : ''
  return Object.assign(new Error(`could not start the join front${hint}: ${(err as Error).message}`), { code: 'JOIN_FRONT' })
}

function answerFront(child: ChildProcess, broker: JoinBroker, raw: unknown, inFlight: { n: number }): void {
  const m = fromFrontSchema.safeParse(raw)
  const send = (msg: ToFront) => void (child.connected && child.send(msg))
  if (!m.success) return void log.error({ reason: m.error.message.slice(0, 200) }, 'malformed message from the join front; ignored')
  const msg = m.data
  if (msg.t === 'key') void broker.inviteKey(msg.id).then((key) => send({ t: 'key', q: msg.q, ...(key ? { key: key.toString('base64') } : {}) }))
  else if (msg.t === 'redeem') {
    if (inFlight.n >= MAX_IN_FLIGHT) return send({ t: 'answer', q: msg.q, status: STATUS_ERROR, body: Buffer.from(GENERIC_REFUSAL).toString('base64'), served: false })
    inFlight.n++
    void broker
      .redeem(Buffer.from(msg.payload, 'base64'))
      .then((a) => send({ t: 'answer', q: msg.q, status: a.status, body: a.body.toString('base64'), served: a.served }))
      .finally(() => inFlight.n--)
  } else if (msg.t === 'stats')
    tell({
      t: 'stats',
      stats: { served: totals.served + msg.stats.served, refused: totals.refused + msg.stats.refused, rateLimited: totals.rateLimited + msg.stats.rateLimited },
      frontPid: child.pid ?? 0,
    })
}

/** Starts a front and waits for it to be ready for its socket. */
function forkFront(config: BrokerConfig, id: { uid: number; gid: number } | undefined): ChildProcess {
  const env: Record<string, string> = { PATH: '/usr/sbin:/usr/bin:/sbin:/bin' }
  for (const k of ['TINC_CONSUL_LOG_LEVEL', 'TINC_CONSUL_LOG_FORMAT']) if (process.env[k]) env[k] = process.env[k]
  if (config.burst) env.TINC_CONSUL_JOIN_BURST = String(config.burst)
  if (config.refillMs) env.TINC_CONSUL_JOIN_REFILL_MS = String(config.refillMs)
  try {
    return fork(frontFile(), [], { ...(id ?? {}), env, stdio: ['ignore', 'inherit', 'inherit', 'ipc'] })
  } catch (err) {
    throw frontFailed(err, id)
  }
}

/**
 * Starts a front, and only once it is ready binds the port and hands it over,
 * closing our copy: a connection this process accepted would have nobody to
 * answer it. Resolves with the bound port.
 */
async function startFront(config: BrokerConfig, broker: JoinBroker, id: { uid: number; gid: number } | undefined, port: number): Promise<number> {
  const child = forkFront(config, id)
  front = child
  const inFlight = { n: 0 }
  let last: JoinStats = { served: 0, refused: 0, rateLimited: 0 }
  return new Promise((resolve, reject) => {
    child.once('error', (err) => reject(frontFailed(err, id)))
    child.on('message', (raw: unknown) => {
      const m = fromFrontSchema.safeParse(raw)
      if (m.success && m.data.t === 'ready')
        return void handOver(config, child, port).then((bound) => {
          // A replacement front takes the port this one got, even when the first bind asked for any.
          port = bound
          resolve(bound)
        }, reject)
      if (m.success && m.data.t === 'stats') last = m.data.stats
      answerFront(child, broker, raw, inFlight)
    })
    child.on('exit', (code, signal) => {
      for (const k of Object.keys(totals) as Array<keyof JoinStats>) totals[k] += last[k]
      if (front === child) front = undefined
      reject(new Error(`the join front exited before it was ready (code ${code}, signal ${signal})`))
      if (closing) return
      log.error({ code, signal }, 'the join front exited; starting another')
      setTimeout(() => void startFront(config, broker, id, port).catch((err: unknown) => log.error({ err }, 'could not restart the join front')), 1000).unref()
    })
  })
}

async function handOver(config: BrokerConfig, child: ChildProcess, port: number): Promise<number> {
  const server = createServer((socket) => socket.destroy())
  await listenOn(server, port, config.host, log, 'join')
  const bound = (server.address() as { port: number }).port
  await new Promise<void>((resolve, reject) => child.send({ t: 'server' } satisfies ToFront, server, (err) => (err ? reject(err) : resolve())))
  server.close()
  return bound
}

/**
 * Lists this join server under join-endpoints/<self> (init or the redemption that made it a join
 * server usually has already, maybe on another port). Resolves after the first try; a failed
 * write is retried every 10 s until one succeeds, never fatal.
 */
async function publishEndpoints(config: BrokerConfig, client: ReturnType<typeof createConsulClient>, port: number): Promise<void> {
  const layout = kvLayout(config.net, config.prefix)
  const endpoints = config.endpoints.map((e) => e.replace(/:0$/, `:${port}`))
  const once = (): Promise<void> =>
    publishJoinEndpoints(client, layout, config.self, endpoints).then(
      (wrote) => void (wrote && log.info({ endpoints }, 'listed as a join server')),
      (err: unknown) => {
        log.warn({ err }, 'could not list this join server in Consul yet; retrying in 10 s')
        setTimeout(() => void once(), 10_000).unref()
      },
    )
  await once()
}

async function start(config: BrokerConfig): Promise<void> {
  const client = createConsulClient({ url: config.consulUrl, token: process.env.TINC_CONSUL_JOIN_TOKEN || undefined })
  let aclOn: boolean | undefined
  const broker = createJoinBroker({ net: config.net, layout: kvLayout(config.net, config.prefix), client, acl: async () => (aclOn ??= await aclsEnabled(client)), gossipKey: config.gossipKey, log })
  const id = frontIdentity(config.user)
  const port = await startFront(config, broker, id, config.port)
  await publishEndpoints(config, client, port)
  tell({ t: 'ready', port, frontPid: front?.pid ?? 0, frontUid: id?.uid ?? process.getuid?.() ?? -1 })
}

const stop = () => {
  closing = true
  front?.kill('SIGTERM')
  setTimeout(() => process.exit(0), 200).unref()
}
process.on('SIGTERM', stop)
process.on('disconnect', stop)
process.once('message', (raw: unknown) => {
  const c = brokerConfigSchema.safeParse((raw as { config?: unknown } | undefined)?.config)
  if (!c.success) return tell({ t: 'failed', code: 'JOIN_CONFIG', message: c.error.message })
  start(c.data).catch((err: unknown) => {
    const e = err as { code?: string; message?: string }
    tell({ t: 'failed', code: e.code ?? 'JOIN_START', message: e.message ?? String(err) })
    setTimeout(() => process.exit(1), 100).unref()
  })
})
