import { defineCommand } from 'citty'
import { UsageError } from '../errors.ts'
import { createLogger } from '../log.ts'
import { DEFAULT_RECORD_WATCH_LIMIT, startSync } from '../mesh/sync.ts'
import { consulArgs } from './common.ts'
import { described, envDefault } from './env.ts'
import { parseIntFlag } from './parse.ts'

export function requireNet(net: string | undefined): string {
  if (!net) throw new UsageError('BAD_FLAG', '--net is required (or set TINC_CONSUL_NET)')
  return net
}

export const runCommand = defineCommand({
  meta: { name: 'run', description: 'Run the sidecar: publish this node\'s record, keep every peer\'s host file and the ConnectTo block in sync, reload tincd when needed' },
  args: {
    ...consulArgs,
    dir: { type: 'string', description: described('tinc config directory (default /etc/tinc/<net>)', 'dir'), default: process.env.TINC_CONSUL_DIR },
    'state-dir': { type: 'string', description: described('Where pins and the cached view live (default /var/lib/tinc-consul/<net>)', 'state-dir'), default: process.env.TINC_CONSUL_STATE_DIR },
    pidfile: { type: 'string', description: described('tincd pidfile to send SIGHUP to (default /var/run/tinc.<net>.pid)', 'pidfile'), default: process.env.TINC_CONSUL_PIDFILE },
    wait: { type: 'string', description: described('Blocking-query wait in seconds (Consul caps it at 600)', 'wait'), default: envDefault('wait', '300') },
    'record-watch-limit': {
      type: 'string',
      description: described('Most peer records watched one query each; above it every change re-reads all records. Each query holds a connection to the agent, which allows 200 per client by default; 0 always re-reads', 'record-watch-limit'),
      default: envDefault('record-watch-limit', String(DEFAULT_RECORD_WATCH_LIMIT)),
    },
  },
  async run({ args }) {
    const net = requireNet(args.net)
    const log = createLogger()
    const daemon = await startSync({
      net,
      tincDir: args.dir ?? `/etc/tinc/${net}`,
      stateDir: args['state-dir'] ?? `/var/lib/tinc-consul/${net}`,
      pidFile: args.pidfile ?? `/var/run/tinc.${net}.pid`,
      consulUrl: args.consul,
      token: args.token || undefined,
      prefix: args.prefix || undefined,
      waitSeconds: parseIntFlag('wait', args.wait, 1, 600),
      recordWatchLimit: parseIntFlag('record-watch-limit', args['record-watch-limit'], 0, 10_000),
      log,
    })
    log.info({ node: daemon.self }, 'tinc-consul running')
    await new Promise<void>((resolve) => {
      const stop = () => resolve()
      process.once('SIGINT', stop)
      process.once('SIGTERM', stop)
    })
    log.info('stopping')
    await daemon.stop()
  },
})
