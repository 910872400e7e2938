import type { Server } from 'node:net'
import type { Logger } from '../log.ts'

/**
 * Binds a server on several addresses, where one of them (the VPN address) may
 * not exist yet: it appears only once tincd has run tinc-up. Such an address
 * is retried every `retryMs` until it binds or `stop()`; any other failure is
 * thrown for the caller to explain (and to close what did bind).
 */
export interface Binding {
  /** Addresses still waiting to come up. */
  pending(): string[]
  stop(): void
}

export async function bindAll(hosts: string[], bindOne: (host: string) => Promise<void>, opts: { log: Logger; what: string; port: number; retryMs?: number }): Promise<Binding> {
  const pending = new Set<string>()
  let timer: NodeJS.Timeout | undefined
  let stopped = false
  for (const host of hosts) {
    try {
      await bindOne(host)
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EADDRNOTAVAIL') throw err
      opts.log.warn({ host, port: opts.port }, `address not up yet; will serve ${opts.what} there once it is`)
      pending.add(host)
    }
  }
  const retry = () => {
    timer = undefined
    if (stopped || pending.size === 0) return
    void Promise.all(
      [...pending].map((host) =>
        bindOne(host).then(
          () => {
            pending.delete(host)
            opts.log.info({ host, port: opts.port }, `serving ${opts.what} on an address that has come up`)
          },
          (err: NodeJS.ErrnoException) => {
            // Still not up is expected; anything else (the port taken meanwhile) is worth saying.
            if (err.code !== 'EADDRNOTAVAIL') opts.log.warn({ err, host, port: opts.port }, `cannot serve ${opts.what} there yet; retrying`)
          },
        ),
      ),
    ).then(() => {
      if (pending.size && !stopped) timer = setTimeout(retry, opts.retryMs ?? 1000).unref()
    })
  }
  if (pending.size) timer = setTimeout(retry, opts.retryMs ?? 1000).unref()
  return {
    pending: () => [...pending],
    stop() {
      stopped = true
      clearTimeout(timer)
    },
  }
}

/**
 * Listens, rejecting on a bind error; afterwards errors (EMFILE on accept, say) are logged
 * instead of thrown, since an `error` event nobody listens to would end the daemon.
 */
export function listenOn(server: Server, port: number, host: string, log: Logger, what: string): Promise<void> {
  return new Promise((resolve, reject) => {
    server.once('error', reject)
    server.listen(port, host, () => {
      server.off('error', reject)
      server.on('error', (err) => log.error({ err, host, port }, `${what} server error`))
      resolve()
    })
  })
}
