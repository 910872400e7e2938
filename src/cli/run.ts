import { defineCommand } from 'citty'
import { defaultStateDir } from '../config-file.ts'
import { UsageError } from '../errors.ts'
import { createLogger } from '../log.ts'
import { aclsEnabled } from '../consul/acl.ts'
import { createConsulClient } from '../consul/client.ts'
import { kvLayout } from '../consul/kv-layout.ts'
import { DEFAULT_JOIN_PORT, startJoinServer, type JoinServer } from '../mesh/join-server.ts'
import { buildOwnRecord, readTincName } from '../mesh/publish.ts'
import { DEFAULT_RECORD_WATCH_LIMIT, startSync } from '../mesh/sync.ts'
import { applyEvent, watchEvents, type PeerLink } from '../tinc/events.ts'
import { tincDirFor } from '../tinc/setup.ts'
import { eventsFileFor } from '../mesh/init.ts'
import { nextSerial, zoneInputFrom } from '../dns/feed.ts'
import { hostsLines, writeHostsBlock } from '../dns/hosts-file.ts'
import { startDnsServer, type DnsServer } from '../dns/server.ts'
import type { MeshState } from '../mesh/sync.ts'
import { consulArgs } from './common.ts'
import { dnsArgs, dnsSettings } from './dns-args.ts'
import { defaultServicesDir, serviceRunArgs } from './service-args.ts'
import { startServices } from '../services/registrar.ts'
import { createCollector } from '../status/collect.ts'
import { DEFAULT_STATUS_PORT, startStatusServer, type StatusServer } from '../status/server.ts'
import { described, envDefault, envFlag } from './env.ts'
import { listFlag, parseIntFlag } from './parse.ts'

export function requireNet(net: string | undefined): string {
  if (!net) throw new UsageError('BAD_FLAG', '--net is required (or set TINC_CONSUL_NET)')
  return net
}

export const runCommand = defineCommand({
  meta: { name: 'run', description: 'Run the sidecar: publish this node\'s record, keep every peer\'s host file and the ConnectTo block in sync, reload tincd when needed' },
  args: {
    ...consulArgs,
    dir: { type: 'string', description: described('tinc\'s config root; the network lives in <dir>/<net>', 'dir'), default: envDefault('dir', '/etc/tinc') },
    'state-dir': { type: 'string', description: described('Where pins and the cached view live (default /var/lib/tinc-consul/<net>)', 'state-dir'), default: process.env.TINC_CONSUL_STATE_DIR },
    pidfile: { type: 'string', description: described('tincd pidfile to send SIGHUP to (default /var/run/tinc.<net>.pid)', 'pidfile'), default: process.env.TINC_CONSUL_PIDFILE },
    wait: { type: 'string', description: described('Blocking-query wait in seconds (Consul caps it at 600)', 'wait'), default: envDefault('wait', '300') },
    'record-watch-limit': {
      type: 'string',
      description: described('Most peer records watched one query each; above it every change re-reads all records. Each query holds a connection to the agent, which allows 200 per client by default; 0 always re-reads', 'record-watch-limit'),
      default: envDefault('record-watch-limit', String(DEFAULT_RECORD_WATCH_LIMIT)),
    },
    'join-port': { type: 'string', description: described('TCP port for the join endpoint on public nodes; 0 turns it off', 'join-port'), default: envDefault('join-port', String(DEFAULT_JOIN_PORT)) },
    'join-listen': { type: 'string', description: described('Address the join endpoint listens on', 'join-listen'), default: envDefault('join-listen', '0.0.0.0') },
    'run-dir': { type: 'string', description: described('Runtime directory; tinc\'s hook scripts report to <run-dir>/<net>/tinc-events', 'run-dir'), default: envDefault('run-dir', '/run/tinc-consul') },
    'join-token': { type: 'string', description: described('Consul token for the join endpoint (init writes one; default: --token)', 'join-token'), default: process.env.TINC_CONSUL_JOIN_TOKEN },
    ...dnsArgs,
    ...serviceRunArgs,
    status: { type: 'boolean', description: described('Serve /status, /tincstat, /metrics and the graph over HTTP (--no-status turns it off)', 'status'), default: envFlag('status', true) },
    'status-port': { type: 'string', description: described('Status HTTP port (tincstat used 9000 too)', 'status-port'), default: envDefault('status-port', String(DEFAULT_STATUS_PORT)) },
    'status-listen': { type: 'string', description: described('Addresses to serve status on besides the VPN address, comma-separated ("" for none)', 'status-listen'), default: envDefault('status-listen', '127.0.0.1') },
    'tinc-log': { type: 'string', description: described('tincd\'s log file, where its state dumps land (start tincd with --logfile; default /var/log/tinc.<net>.log)', 'tinc-log'), default: process.env.TINC_CONSUL_TINC_LOG },
  },
  async run({ args }) {
    const net = requireNet(args.net)
    const log = createLogger()
    const tincDir = tincDirFor(args.dir, net)
    // Every flag is checked before anything starts: a typo is a usage error, not a half-started daemon.
    const joinPort = parseIntFlag('join-port', args['join-port'], 0, 65535)
    const waitSeconds = parseIntFlag('wait', args.wait, 1, 600)
    const recordWatchLimit = parseIntFlag('record-watch-limit', args['record-watch-limit'], 0, 10_000)
    const resyncMs = parseIntFlag('services-resync', args['services-resync'], 1, 3600) * 1000
    const statusPort = parseIntFlag('status-port', args['status-port'], 0, 65535)
    const statusListen = listFlag('status-listen', args['status-listen'])
    const dnsOpts = dnsSettings(args)
    const pidFile = args.pidfile ?? `/var/run/tinc.${net}.pid`
    const layout = kvLayout(net, args.prefix || undefined)
    // Only public nodes serve joins: a node behind NAT can't be reached by a newcomer anyway.
    const self = await readTincName(tincDir)
    const own = await buildOwnRecord(tincDir, self)
    const serveJoins = joinPort > 0 && own.addresses.length > 0
    const withVpn = (extra: string[]) => [own.vpnAddress, ...extra.filter((h) => h !== own.vpnAddress)]

    // What has started, closed in reverse order on shutdown and when a later start fails.
    const closers: Array<() => unknown> = []
    const closeAll = async () => {
      for (const close of closers.reverse()) await close()
    }
    try {
      // DNS starts first and answers SERVFAIL until the first view (from the cache or Consul) arrives.
      let dns: DnsServer | undefined
      if (dnsOpts.enabled) {
        const server = await startDnsServer({ hosts: withVpn(dnsOpts.listen), port: dnsOpts.port, workers: dnsOpts.workers, log })
        closers.push(() => server.close())
        dns = server
      }
      const dnsLog = log.child({ component: 'dns' })
      let serial = 0
      let lastInput = ''
      let hostsWrite = Promise.resolve()
      closers.push(() => hostsWrite)
      const onState = (state: MeshState) => {
        // Most applies change nothing DNS shows (a peer's updatedAt, a revocation list that
        // didn't move): rebuild, copy to the helpers and bump the serial only when names change.
        const input = zoneInputFrom(state, { self, ttl: dnsOpts.ttl }, serial)
        const key = JSON.stringify({ ...input, serial: 0 })
        if (key === lastInput) return
        lastInput = key
        serial = input.serial = nextSerial(serial)
        if (dns) {
          const zone = dns.update(input)
          if (zone.skipped.length) dnsLog.warn({ skipped: zone.skipped }, 'some names are left out of DNS')
        }
        const file = dnsOpts.hostsFile
        if (file) hostsWrite = hostsWrite.then(() => writeHostsBlock(file, net, hostsLines(input.domain, input.nodes)).then(() => undefined, (err: unknown) => dnsLog.error({ err, file }, 'could not update the hosts file block')))
      }
      const daemon = await startSync({
        net,
        tincDir,
        joinPort: serveJoins ? joinPort : undefined,
        stateDir: args['state-dir'] ?? defaultStateDir(net),
        pidFile,
        consulUrl: args.consul,
        token: args.token || undefined,
        prefix: args.prefix || undefined,
        waitSeconds,
        recordWatchLimit,
        log,
        onState,
      })
      closers.push(() => daemon.stop())
      // Services go to the local agent whatever the state of the rest: a node's own services
      // don't wait for the mesh view, and a broken file never stops the daemon.
      const services = await startServices({
        dir: args['services-dir'] || defaultServicesDir(args['config-dir'], net),
        who: { net, node: self, address: own.vpnAddress },
        consulUrl: args.consul,
        token: args.token || undefined,
        allowScripts: args['script-checks'],
        deregisterOnExit: args['deregister-on-exit'],
        resyncMs,
        log,
      }).catch((err: unknown) => void log.error({ err }, 'could not start the services registrar; running without it'))
      if (services) closers.push(() => services.stop())
      let joins: JoinServer | undefined
      if (serveJoins) {
        const joinToken = args['join-token'] || args.token || undefined
        const client = createConsulClient({ url: args.consul, token: joinToken })
        const server = await startJoinServer({ net, layout, client, url: args.consul, token: joinToken, acl: await aclsEnabled(client), host: args['join-listen'], port: joinPort, log })
        closers.push(() => server.close())
        joins = server
      }
      // What tincd reports through its hooks: who is reachable right now, for status.
      const links = new Map<string, PeerLink>()
      const tincLog = log.child({ component: 'tinc' })
      const events = await watchEvents(eventsFileFor(args['run-dir'], net), (e) => {
        if (applyEvent(links, e)) tincLog.info({ peer: e.node, remote: e.remote }, e.kind === 'host-up' ? 'peer reachable' : 'peer unreachable')
      }, tincLog)
      closers.push(() => events.stop())
      let status: StatusServer | undefined
      if (args.status) {
        const collector = await createCollector({ net, self, tincDir, pidFile, logFile: args['tinc-log'] || `/var/log/tinc.${net}.log`, sync: daemon, dns, links })
        const server = await startStatusServer({ hosts: withVpn(statusListen), port: statusPort, snapshot: () => collector.snapshot(), log })
        closers.push(() => server.close())
        status = server
      }
      log.info({ node: daemon.self, joinPort: joins?.port, dnsPort: dns?.port, statusPort: status?.port }, 'tinc-consul running')
    } catch (err) {
      await closeAll()
      throw err
    }
    await new Promise<void>((resolve) => {
      const stop = () => resolve()
      process.once('SIGINT', stop)
      process.once('SIGTERM', stop)
    })
    log.info('stopping')
    await closeAll()
  },
})
