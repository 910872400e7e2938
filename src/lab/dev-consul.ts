import { mkdtemp, rm } from 'node:fs/promises'
import { createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { spawn } from 'node:child_process'
import { createConsulClient } from '../consul/client.ts'
import { LabError } from '../errors.ts'
import { logTail, waitFor } from './daemon.ts'
import { requireConsul } from './provision.ts'

/**
 * A single real Consul agent in dev mode on loopback, with free ports, for
 * tests and benchmarks that need Consul but not a network (no root needed).
 */
export interface DevConsul {
  url: string
  /** Consul's own DNS interface, UDP and TCP on 127.0.0.1. */
  dnsPort: number
  stop(): Promise<void>
}

export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer()
    s.once('error', reject)
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as { port: number }).port
      s.close(() => resolve(port))
    })
  })
}

export async function startDevConsul(opts: { managementToken?: string; maxConnsPerClient?: number } = {}): Promise<DevConsul> {
  const bin = await requireConsul()
  const dir = await mkdtemp(join(tmpdir(), 'tinc-consul-dev-'))
  const [http, dns, serfLan, serfWan, server] = [await freePort(), await freePort(), await freePort(), await freePort(), await freePort()]
  const args = [
    'agent',
    '-dev',
    '-bind=127.0.0.1',
    '-client=127.0.0.1',
    `-http-port=${http}`,
    `-dns-port=${dns}`,
    `-serf-lan-port=${serfLan}`,
    `-serf-wan-port=${serfWan}`,
    `-server-port=${server}`,
    '-grpc-port=-1',
    '-grpc-tls-port=-1',
    '-log-level=warn',
    `-hcl=disable_update_check = true`,
  ]
  // Consul allows 200 connections per client IP; a benchmark running many daemons on one
  // agent (each holding three blocking queries) needs more than a real node ever would.
  if (opts.maxConnsPerClient) args.push(`-hcl=limits { http_max_conns_per_client = ${opts.maxConnsPerClient} }`)
  if (opts.managementToken) args.push(`-hcl=acl { enabled = true, default_policy = "deny", tokens { initial_management = "${opts.managementToken}" } }`)
  const logFile = join(dir, 'consul.log')
  const { openSync, closeSync } = await import('node:fs')
  const fd = openSync(logFile, 'a')
  const child = spawn(bin, args, { stdio: ['ignore', fd, fd] })
  closeSync(fd)
  let exited = false
  child.on('exit', () => (exited = true))
  const url = `http://127.0.0.1:${http}`
  const stop = async () => {
    if (!exited) {
      child.kill('SIGTERM')
      await new Promise((r) => child.once('exit', r))
    }
    await rm(dir, { recursive: true, force: true })
  }
  try {
    const client = createConsulClient({ url, token: opts.managementToken, timeoutMs: 2000 })
    await waitFor(
      'the dev Consul agent to elect itself',
      async () => {
        if (exited) throw new LabError('DEV_CONSUL_EXITED', `consul exited: ${logTail(logFile)}`)
        return (await client.leader()) || undefined
      },
      { timeoutMs: 30_000, intervalMs: 100 },
    )
  } catch (err) {
    await stop()
    throw err
  }
  return { url, dnsPort: dns, stop }
}
