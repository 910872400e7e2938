import { siblingModule } from '../util/proc.ts'
import { fork, type ChildProcess } from 'node:child_process'
import { createServer } from 'node:net'
import { TincConsulError } from '../errors.ts'
import type { Logger } from '../log.ts'
import { listenOn } from '../util/listen.ts'
import { createJoinBroker, type JoinBrokerOptions } from './join-broker.ts'
import { serveJoinFront, type JoinStats } from './join-front.ts'
import { fromBrokerSchema, type BrokerConfig } from './join-ipc.ts'

export { DEFAULT_JOIN_PORT } from './join-endpoints.ts'

export interface JoinServer {
  readonly port: number
  readonly stats: JoinStats
  close(): Promise<void>
}

export interface JoinServerOptions extends JoinBrokerOptions {
  host?: string
  port: number
  /** Requests allowed from one source address in a burst, then one per `refillMs`. */
  burst?: number
  refillMs?: number
}

/**
 * Front and broker in this process: for tests of the exchange, and for
 * callers that hold no token worth separating. `run` uses
 * startSeparatedJoinServer.
 */
export async function startJoinServer(opts: JoinServerOptions): Promise<JoinServer> {
  const broker = createJoinBroker(opts)
  const server = createServer()
  const { stats } = serveJoinFront(server, { broker, log: opts.log, burst: opts.burst, refillMs: opts.refillMs })
  await listenOn(server, opts.port, opts.host ?? '0.0.0.0', opts.log, 'join').catch((err: Error) => {
    throw new TincConsulError('JOIN_LISTEN', `cannot serve joins on ${opts.host ?? '0.0.0.0'}:${opts.port}: ${err.message}`, { cause: err })
  })
  const port = (server.address() as { port: number }).port
  return { port, stats, close: () => new Promise<void>((resolve) => server.close(() => resolve())) }
}

export interface SeparatedJoinServer extends JoinServer {
  /** The front's process id and user id, for status and tests. */
  readonly front: { pid: number; uid: number }
  readonly brokerPid: number
}

/**
 * The join endpoint as `run` serves it, in two processes of its own:
 *
 * - the broker holds the join-server token (it creates other nodes' tokens,
 *   so it is as strong as a management token) and touches no network input;
 * - the front, forked by the broker as `user` (default nobody) with an empty
 *   environment, reads the internet and holds no token at all.
 *
 * The daemon itself keeps only its node token. A parser bug in the front
 * yields an unprivileged process that can ask the broker to redeem requests
 * it can't forge without an invite.
 */
export async function startSeparatedJoinServer(config: BrokerConfig, token: string | undefined, log: Logger): Promise<SeparatedJoinServer> {
  const file = siblingModule(import.meta.url, 'join-broker-process')
  const env: NodeJS.ProcessEnv = { ...process.env, TINC_CONSUL_JOIN_TOKEN: token ?? '' }
  const child = fork(file, [], { env, stdio: ['ignore', 'inherit', 'inherit', 'ipc'] })
  const stats: JoinStats = { served: 0, refused: 0, rateLimited: 0 }
  const ready = await new Promise<{ port: number; frontPid: number; frontUid: number }>((resolve, reject) => {
    child.on('message', (raw: unknown) => {
      const m = fromBrokerSchema.safeParse(raw)
      if (!m.success) return
      if (m.data.t === 'ready') resolve(m.data)
      else if (m.data.t === 'failed')
        reject(new TincConsulError(m.data.code.startsWith('JOIN_') ? m.data.code : 'JOIN_LISTEN', `cannot serve joins on ${config.host}:${config.port}: ${m.data.message}`))
      else Object.assign(stats, m.data.stats)
    })
    child.once('exit', (code, signal) => reject(new TincConsulError('JOIN_BROKER', `the join broker exited at start (code ${code}, signal ${signal})`)))
    child.send({ t: 'start', config })
  }).catch(async (err: unknown) => {
    await stopChild(child)
    throw err
  })
  let closing = false
  child.on('exit', (code, signal) => {
    if (!closing) log.error({ code, signal }, 'the join broker exited; joins are off until the daemon restarts')
  })
  return {
    port: ready.port,
    stats,
    front: { pid: ready.frontPid, uid: ready.frontUid },
    brokerPid: child.pid ?? 0,
    close: async () => {
      closing = true
      await stopChild(child)
    },
  }
}

function stopChild(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve()
  return new Promise((resolve) => {
    const timer = setTimeout(() => child.kill('SIGKILL'), 2000)
    child.once('exit', () => {
      clearTimeout(timer)
      resolve()
    })
    child.kill('SIGTERM')
  })
}
