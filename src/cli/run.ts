import { defineCommand, parseArgs, type ParsedArgs } from 'citty'
import { defaultStateDir, reloadConfig } from '../config-file.ts'
import { isGossipKey } from '../consul/gossip-key.ts'
import { UsageError } from '../errors.ts'
import { createLogger, type Logger } from '../log.ts'
import { kvLayout } from '../mesh/kv-layout.ts'
import { DEFAULT_JOIN_PORT, startSeparatedJoinServer, type JoinServer } from '../mesh/join-server.ts'
import { endpointsFor } from '../mesh/join-endpoints.ts'
import { buildOwnRecord, readTincName } from '../mesh/publish.ts'
import { NODES_WATCHES, startSync, type NodesWatch } from '../mesh/sync.ts'
import { keepPath } from '../mesh/keep.ts'
import { applyEvent, watchEvents, type PeerLink } from '../tinc/events.ts'
import { tincDirFor } from '../tinc/setup.ts'
import { eventsFileFor } from '../mesh/init.ts'
import { nextSerial, zoneInputFrom } from '../dns/feed.ts'
import { hostsLines, writeHostsBlock } from '../dns/hosts-file.ts'
import { startDnsServer, type DnsServer } from '../dns/server.ts'
import type { MeshState, SyncDaemon } from '../mesh/sync.ts'
import { consulArgs } from './common.ts'
import { dnsArgs, dnsSettings } from './dns-args.ts'
import { defaultServicesDir, serviceRunArgs } from './service-args.ts'
import { startServices } from '../services/registrar.ts'
import { namingFor } from '../services/naming.ts'
import { createCollector } from '../status/collect.ts'
import { DEFAULT_STATUS_PORT, startStatusServer, type StatusServer } from '../status/server.ts'
import { described, envDefault, envFlag } from './env.ts'
import { listFlag, parseIntFlag, splitList } from './parse.ts'
import { DEFAULT_CONNECT_TO_K, DEFAULT_CONNECT_TO_TIMERS } from '../mesh/connect-to.ts'
import type { ConnectToSettings } from '../mesh/sync.ts'
import { tincBackend } from '../tinc/backend.ts'
import { isTincName } from '../tinc/names.ts'

export function requireNet(net: string | undefined): string {
  if (!net) throw new UsageError('BAD_FLAG', '--net is required (or set TINC_CONSUL_NET)')
  return net
}

/** Longest a stop may take before the daemon gives up on finishing it (systemd's own stop timeout is longer). */
export const STOP_BUDGET_MS = 2000

/** Everything `run` was told, checked: a typo is a usage error, not a half-started daemon. Plain data, so a reload can compare. */
async function runSettings(args: RunArgs) {
  const net = requireNet(args.net)
  const tincDir = tincDirFor(args.dir, net)
  const self = await readTincName(tincDir)
  const own = await buildOwnRecord(tincDir, self)
  const joinPort = parseIntFlag('join-port', args['join-port'], 0, 65535)
  return {
    net,
    self,
    tincDir,
    vpnAddress: own.vpnAddress,
    vpnAddress6: own.vpnAddress6,
    // Only public nodes serve joins: a node behind NAT can't be reached by a newcomer anyway.
    // With a node token but no join-server token, ACLs are on and this node wasn't made a
    // join server (init and `invite --serve-joins` hand one out): its token could redeem nothing.
    joinPort: joinPort > 0 && own.addresses.length > 0 && (args['join-token'] || !args.token) ? joinPort : undefined,
    joinListen: args['join-listen'],
    joinUser: args['join-user'],
    publicAddresses: own.addresses,
    joinToken: args['join-token'] || undefined,
    gossipKey: gossipKey(args['gossip-key']),
    waitSeconds: parseIntFlag('wait', args.wait, 1, 600),
    nodesWatch: nodesWatchFlag(args['nodes-watch']),
    resyncMs: parseIntFlag('services-resync', args['services-resync'], 1, 3600) * 1000,
    maxServices: parseIntFlag('max-services', args['max-services'], 1, 10_000),
    status: args.status,
    statusPort: parseIntFlag('status-port', args['status-port'], 0, 65535),
    statusListen: listFlag('status-listen', args['status-listen']),
    dns: dnsSettings(args),
    pidFile: args.pidfile ?? `/var/run/tinc.${net}.pid`,
    stateDir: args['state-dir'] ?? defaultStateDir(net),
    consulUrl: args.consul,
    token: args.token || undefined,
    prefix: args.prefix || undefined,
    servicesDir: args['services-dir'] || defaultServicesDir(args['config-dir'], net),
    keepFile: args['keep-file'] || keepPath(args['config-dir'], net),
    connectTo: connectToSettings(args),
    accessEnforce: args['access-enforce'],
    scriptChecks: args['script-checks'],
    deregisterOnExit: args['deregister-on-exit'],
    runDir: args['run-dir'],
    tincLog: args['tinc-log'] || `/var/log/tinc.${net}.log`,
    logLevel: logLevel(process.env.TINC_CONSUL_LOG_LEVEL ?? 'info'),
  }
}
type RunSettings = Awaited<ReturnType<typeof runSettings>>

function nodesWatchFlag(v: string | undefined): NodesWatch {
  const found = NODES_WATCHES.find((w) => w === v)
  if (!found) throw new UsageError('BAD_FLAG', `--nodes-watch must be one of ${NODES_WATCHES.join(', ')}, got ${JSON.stringify(v)}`)
  return found
}

function connectToSettings(args: {
  'connect-to'?: string
  'connect-to-pin'?: string
  'connect-to-grace'?: string
  'connect-to-bench'?: string
  sponsor?: string
  'sponsor-until'?: string
}): ConnectToSettings | undefined {
  const k = args['connect-to'] ?? String(DEFAULT_CONNECT_TO_K)
  const pinned = args['connect-to-pin'] ? splitList(args['connect-to-pin']) : undefined
  for (const p of pinned ?? []) if (!isTincName(p)) throw new UsageError('BAD_FLAG', `--connect-to-pin: not a tinc node name: ${JSON.stringify(p)}`)
  if (k === 'all' && !pinned) return undefined
  const until = args['sponsor-until'] ? Date.parse(args['sponsor-until']) : NaN
  if (args.sponsor && (!isTincName(args.sponsor) || Number.isNaN(until))) throw new UsageError('BAD_FLAG', '--sponsor needs a tinc node name and --sponsor-until an ISO 8601 time')
  const graceMs = parseIntFlag('connect-to-grace', args['connect-to-grace'] ?? String(DEFAULT_CONNECT_TO_TIMERS.graceMs / 1000), 1, 86_400) * 1000
  const benchMs = parseIntFlag('connect-to-bench', args['connect-to-bench'] ?? String(DEFAULT_CONNECT_TO_TIMERS.benchMs / 1000), 1, 86_400) * 1000
  return {
    k: k === 'all' ? Number.MAX_SAFE_INTEGER : parseIntFlag('connect-to', k, 1, 1000),
    pinned,
    sponsor: args.sponsor ? { name: args.sponsor, until } : undefined,
    timers: { graceMs, benchMs, benchMaxMs: Math.max(benchMs, DEFAULT_CONNECT_TO_TIMERS.benchMaxMs) },
  }
}

/** Refused at start: a bad key in a join reply would be refused by the joiner after its invite was spent. */
function gossipKey(v: string | undefined): string | undefined {
  if (!v) return undefined
  if (!isGossipKey(v)) throw new UsageError('BAD_FLAG', '--gossip-key (TINC_CONSUL_GOSSIP_KEY) must be 32 bytes in base64, as `consul keygen` prints')
  return v
}

const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']
function logLevel(v: string): string {
  if (!LOG_LEVELS.includes(v)) throw new UsageError('BAD_FLAG', `TINC_CONSUL_LOG_LEVEL must be one of ${LOG_LEVELS.join(', ')}, got ${JSON.stringify(v)}`)
  return v
}

/**
 * Starts the daemon's parts and returns what stops them, in reverse order. When
 * one fails to start, those already started are stopped before the error goes up.
 */
async function startParts(s: RunSettings, log: Logger, reread: () => void): Promise<() => Promise<void>> {
  const { net, self } = s
  const withVpn = (extra: string[]) => [s.vpnAddress, ...extra.filter((h) => h !== s.vpnAddress)]
  const closers: Array<() => unknown> = []
  const closeAll = async () => {
    for (const close of closers.splice(0).reverse()) await close()
  }
  try {
    // DNS starts first and answers SERVFAIL until the first view (from the cache or Consul) arrives.
    let dns: DnsServer | undefined
    if (s.dns.enabled) {
      // DNS listens on the IPv6 VPN address too (networks with cidr6), so split DNS can point there.
      const server = await startDnsServer({
        hosts: s.vpnAddress6 ? [...withVpn(s.dns.listen), s.vpnAddress6] : withVpn(s.dns.listen),
        port: s.dns.port,
        workers: s.dns.workers,
        answers: s.dns.answers,
        tcp: s.dns.tcp,
        log,
      })
      closers.push(() => server.close())
      dns = server
    }
    // One reader of tincd's state for status and the ConnectTo keeper: tincd answers one dump a second at most.
    const readState = tincBackend().stateReader({ logFile: s.tincLog, pidFile: s.pidFile })
    const feed = dnsFeed(s, dns, log)
    closers.push(() => feed.settled())
    const onState = feed.onState
    const daemon = await startSync({
      net,
      tincDir: s.tincDir,
      joinPort: s.joinPort,
      stateDir: s.stateDir,
      pidFile: s.pidFile,
      consulUrl: s.consulUrl,
      token: s.token,
      prefix: s.prefix,
      waitSeconds: s.waitSeconds,
      nodesWatch: s.nodesWatch,
      maxServicesPerNode: s.maxServices,
      keepFile: s.keepFile,
      connectTo: s.connectTo && { ...s.connectTo, readState },
      accessEnforce: s.accessEnforce,
      log,
      onState,
      // `group move` gave this node a new address: read the settings again, as a SIGHUP does, and
      // the parts bound to the old address start again on the new one.
      onRenumbered: reread,
    })
    closers.push(() => daemon.stop())
    const services = await startRegistrar(s, daemon, log)
    if (services) closers.push(() => services.stop())
    let joins: JoinServer | undefined
    if (s.joinPort) {
      joins = await startJoins(s, s.joinPort, self, log)
      closers.push(() => joins?.close() ?? Promise.resolve())
    }
    const { links, events } = await watchLinks(s, log)
    closers.push(() => events.stop())
    let status: StatusServer | undefined
    if (s.status) {
      const collector = await createCollector({ net, self, tincDir: s.tincDir, pidFile: s.pidFile, logFile: s.tincLog, readDump: readState, sync: daemon, dns, services: services || undefined, links })
      const server = await startStatusServer({ hosts: withVpn(s.statusListen), port: s.statusPort, snapshot: () => collector.snapshot(), log })
      closers.push(() => server.close())
      status = server
    }
    log.info({ node: daemon.self, joinPort: joins?.port, dnsPort: dns?.port, statusPort: status?.port }, 'tinc-consul running')
  } catch (err) {
    await closeAll()
    throw err
  }
  return closeAll
}

/**
 * Services go to the local agent whatever the state of the rest: a node's own services
 * don't wait for the mesh view, and a broken file never stops the daemon.
 */
function startRegistrar(s: RunSettings, daemon: SyncDaemon, log: Logger) {
  return startServices({
    dir: s.servicesDir,
    who: { net: s.net, node: s.self, address: s.vpnAddress },
    consulUrl: s.consulUrl,
    token: s.token,
    allowScripts: s.scriptChecks,
    deregisterOnExit: s.deregisterOnExit,
    resyncMs: s.resyncMs,
    // Every node names services as the network record says: nothing is registered before it is known.
    naming: () => {
      const network = daemon.network()
      return network && namingFor(s.net, network)
    },
    maxServices: s.maxServices,
    log,
  }).catch((err: unknown) => void log.error({ err }, 'could not start the services registrar; running without it'))
}

/**
 * Feeds each mesh state to DNS and the hosts block. Most applies change nothing DNS shows (a
 * peer's updatedAt, a revocation list that didn't move): the zone is rebuilt, copied to the
 * helpers and its serial bumped only when names change.
 */
function dnsFeed(s: RunSettings, dns: DnsServer | undefined, log: Logger): { onState(state: MeshState): void; settled(): Promise<void> } {
  const dnsLog = log.child({ component: 'dns' })
  let serial = 0
  let lastInput = ''
  let hostsWrite = Promise.resolve()
  return {
    onState(state) {
      const input = zoneInputFrom(state, { self: s.self, ttl: s.dns.ttl }, serial)
      const key = JSON.stringify({ ...input, serial: 0 })
      if (key === lastInput) return
      lastInput = key
      serial = input.serial = nextSerial(serial)
      if (dns) {
        const zone = dns.update(input)
        if (zone.skipped.length) dnsLog.warn({ skipped: zone.skipped }, 'some names are left out of DNS')
      }
      const file = s.dns.hostsFile
      if (file)
        hostsWrite = hostsWrite.then(() =>
          writeHostsBlock(file, s.net, hostsLines(input.domain, input.nodes)).then(
            () => undefined,
            (err: unknown) => dnsLog.error({ err, file }, 'could not update the hosts file block'),
          ),
        )
    },
    settled: () => hostsWrite,
  }
}

/** What tincd reports through its hooks: who is reachable right now, for status. */
async function watchLinks(s: RunSettings, log: Logger) {
  const links = new Map<string, PeerLink>()
  const tincLog = log.child({ component: 'tinc' })
  const events = await watchEvents(
    eventsFileFor(s.runDir, s.net),
    (e) => {
      if (applyEvent(links, e)) tincLog.info({ peer: e.node, remote: e.remote }, e.kind === 'host-up' ? 'peer reachable' : 'peer unreachable')
    },
    tincLog,
  )
  return { links, events }
}

/** The join endpoint in its own two processes: the join-server token goes only to the broker, this one keeps the node token. */
function startJoins(s: RunSettings, port: number, self: string, log: Logger): Promise<JoinServer> {
  const config = {
    net: s.net,
    prefix: kvLayout(s.net, s.prefix).prefix,
    consulUrl: s.consulUrl,
    gossipKey: s.gossipKey,
    self,
    host: s.joinListen,
    port,
    endpoints: endpointsFor(s.publicAddresses, port),
    user: s.joinUser,
  }
  return startSeparatedJoinServer(config, s.joinToken, log)
}

const runArgs = {
  ...consulArgs,
  dir: {
    type: 'string',
    description: described("tinc's config root; the network lives in <dir>/<net>", 'dir'),
    get default() {
      return envDefault('dir', '/etc/tinc')
    },
  },
  'state-dir': {
    type: 'string',
    description: described('Where pins and the cached view live (default /var/lib/tinc-consul/<net>)', 'state-dir'),
    get default() {
      return process.env.TINC_CONSUL_STATE_DIR
    },
  },
  pidfile: {
    type: 'string',
    description: described('tincd pidfile to send SIGHUP to (default /var/run/tinc.<net>.pid)', 'pidfile'),
    get default() {
      return process.env.TINC_CONSUL_PIDFILE
    },
  },
  wait: {
    type: 'string',
    description: described('Blocking-query wait in seconds (Consul caps it at 600)', 'wait'),
    get default() {
      return envDefault('wait', '300')
    },
  },
  'nodes-watch': {
    type: 'string',
    description: described(
      'How peer records are followed: "feed" blocks on one query and reads the records the change log names; "recurse" re-reads every record on every change (the naive way)',
      'nodes-watch',
    ),
    get default() {
      return envDefault('nodes-watch', 'feed')
    },
  },
  'connect-to': {
    type: 'string',
    description: described('How many public nodes to keep a ConnectTo to, chosen by rendezvous hashing and replaced when silent; "all" for every one', 'connect-to'),
    get default() {
      return envDefault('connect-to', String(DEFAULT_CONNECT_TO_K))
    },
  },
  'connect-to-pin': {
    type: 'string',
    description: described('Comma-separated public nodes to ConnectTo instead of choosing; the daemon never changes a pinned list', 'connect-to-pin'),
    get default() {
      return process.env.TINC_CONSUL_CONNECT_TO_PIN
    },
  },
  'connect-to-grace': {
    type: 'string',
    description: described('Seconds a chosen public node may go without a meta connection before the next one replaces it', 'connect-to-grace'),
    get default() {
      return envDefault('connect-to-grace', String(DEFAULT_CONNECT_TO_TIMERS.graceMs / 1000))
    },
  },
  'connect-to-bench': {
    type: 'string',
    description: described('Seconds a replaced public node sits out before it is tried again; doubles with each failure in a row, up to an hour', 'connect-to-bench'),
    get default() {
      return envDefault('connect-to-bench', String(DEFAULT_CONNECT_TO_TIMERS.benchMs / 1000))
    },
  },
  sponsor: {
    type: 'string',
    description: described('The node that admitted this one, kept in the ConnectTo list until --sponsor-until (join sets both)', 'sponsor'),
    get default() {
      return process.env.TINC_CONSUL_SPONSOR
    },
  },
  'sponsor-until': {
    type: 'string',
    description: described('When the sponsor leaves the ConnectTo list (ISO 8601 time)', 'sponsor-until'),
    get default() {
      return process.env.TINC_CONSUL_SPONSOR_UNTIL
    },
  },
  'keep-file': {
    type: 'string',
    description: described('Peers the daemon never writes or removes in hosts/, one tinc name per line (default <config-dir>/<net>.keep)', 'keep-file'),
    get default() {
      return process.env.TINC_CONSUL_KEEP_FILE
    },
  },
  'join-port': {
    type: 'string',
    description: described('TCP port for the join endpoint on public nodes; 0 turns it off', 'join-port'),
    get default() {
      return envDefault('join-port', String(DEFAULT_JOIN_PORT))
    },
  },
  'join-listen': {
    type: 'string',
    description: described('Address the join endpoint listens on', 'join-listen'),
    get default() {
      return envDefault('join-listen', '0.0.0.0')
    },
  },
  'join-user': {
    type: 'string',
    description: described("User the join endpoint's internet-facing process runs as (it holds no token); '' keeps the daemon's", 'join-user'),
    get default() {
      return envDefault('join-user', 'nobody')
    },
  },
  'run-dir': {
    type: 'string',
    description: described("Runtime directory; tinc's hook scripts report to <run-dir>/<net>/tinc-events", 'run-dir'),
    get default() {
      return envDefault('run-dir', '/run/tinc-consul')
    },
  },
  'gossip-key': {
    type: 'string',
    description: described('Consul gossip key the join endpoint hands to new nodes (install --consul-server writes it)', 'gossip-key'),
    get default() {
      return process.env.TINC_CONSUL_GOSSIP_KEY
    },
  },
  'join-token': {
    type: 'string',
    description: described('Consul join-server token (init and `invite --serve-joins` hand one out); with --token but none of these, the node serves no joins', 'join-token'),
    get default() {
      return process.env.TINC_CONSUL_JOIN_TOKEN
    },
  },
  ...dnsArgs,
  ...serviceRunArgs,
  'access-enforce': {
    type: 'boolean',
    description: described(
      "Enforce the network's groups and associations with an nftables table on the tinc interface (docs/groups.md); --no-access-enforce turns it off and removes the table",
      'access-enforce',
    ),
    get default() {
      return envFlag('access-enforce', true)
    },
  },
  status: {
    type: 'boolean',
    description: described('Serve /status, /tincstat, /metrics and the graph over HTTP (--no-status turns it off)', 'status'),
    get default() {
      return envFlag('status', true)
    },
  },
  'status-port': {
    type: 'string',
    description: described('Status HTTP port (tincstat used 9000 too)', 'status-port'),
    get default() {
      return envDefault('status-port', String(DEFAULT_STATUS_PORT))
    },
  },
  'status-listen': {
    type: 'string',
    description: described('Addresses to serve status on besides the VPN address, comma-separated ("" for none)', 'status-listen'),
    get default() {
      return envDefault('status-listen', '127.0.0.1')
    },
  },
  'tinc-log': {
    type: 'string',
    description: described("tincd's log file, where its state dumps land (start tincd with --logfile; default /var/log/tinc.<net>.log)", 'tinc-log'),
    get default() {
      return process.env.TINC_CONSUL_TINC_LOG
    },
  },
} as const

type RunArgs = ParsedArgs<typeof runArgs>

/**
 * A rejection nobody handled, or an exception nobody caught, leaves the daemon in a state no
 * one designed: log it with its stack and exit non-zero, so the service manager restarts the
 * daemon, which renders from its cache until Consul answers.
 */
function exitOnUnhandled(log: Logger): void {
  const die = (kind: string) => (err: unknown) => {
    log.fatal({ err }, `${kind}; exiting so the service manager restarts the daemon`)
    process.exit(1)
  }
  process.on('unhandledRejection', die('unhandled promise rejection'))
  process.on('uncaughtException', die('uncaught exception'))
}

export const runCommand = defineCommand({
  meta: { name: 'run', description: "Run the sidecar: publish this node's record, keep every peer's host file and the ConnectTo block in sync, reload tincd when needed" },
  args: runArgs,
  async run({ args, rawArgs }) {
    // The daemon's logs go to stdout for journald; every other command keeps stdout for its output.
    const log = createLogger({ fd: 1 })
    exitOnUnhandled(log)
    // Signals are caught before anything starts: Node's default for SIGHUP is to exit, and a
    // reload or stop that arrives during start-up waits for it instead of killing it half-way.
    let stopRequested = () => {}
    const stopSignal = new Promise<void>((resolve) => (stopRequested = resolve))
    process.once('SIGINT', stopRequested)
    process.once('SIGTERM', stopRequested)
    let earlyHup = false
    const noteHup = () => (earlyHup = true)
    process.on('SIGHUP', noteHup)
    let settings = await runSettings(args).finally(() => process.off('SIGHUP', noteHup))
    let close: () => Promise<void> = async () => {}
    // SIGHUPs queue behind start-up and behind each other, so two never restart the parts at once.
    let busy = (async () => {
      close = await startParts(settings, log, () => onHup())
    })()
    const reload = async () => {
      let next: RunSettings
      try {
        const file = reloadConfig(rawArgs)
        next = await runSettings(parseArgs<typeof runArgs>(rawArgs, runArgs))
        log.info({ file }, 'SIGHUP: settings read again')
      } catch (err) {
        log.error({ err }, 'SIGHUP: the new settings are refused; still running with the previous ones')
        return
      }
      log.level = next.logLevel
      const changed = Object.keys(next).filter((k) => JSON.stringify(next[k as keyof RunSettings]) !== JSON.stringify(settings[k as keyof RunSettings]))
      if (!changed.length) return void log.info('SIGHUP: nothing changed')
      log.info({ changed }, 'SIGHUP: restarting with the new settings')
      const began = Date.now()
      await close()
      try {
        close = await startParts(next, log, () => onHup())
        settings = next
        log.info({ ms: Date.now() - began }, 'SIGHUP: running with the new settings')
      } catch (err) {
        log.error({ err }, 'SIGHUP: the new settings did not start; going back to the previous ones')
        try {
          close = await startParts(settings, log, () => onHup())
        } catch (again) {
          // Neither starts: exit non-zero so the service manager restarts the daemon from scratch.
          log.fatal({ err: again }, 'SIGHUP: the previous settings did not start again either; exiting')
          process.exitCode = 1
          stopRequested()
        }
      }
    }
    const onHup = () => {
      busy = busy.then(reload)
    }
    process.on('SIGHUP', onHup)
    if (earlyHup) onHup()
    try {
      await busy
    } catch (err) {
      process.off('SIGHUP', onHup)
      throw err
    }
    await stopSignal
    process.off('SIGHUP', onHup)
    const began = Date.now()
    log.info('stopping')
    // systemd waits TimeoutStopSec and then kills; a part that hangs must not make the
    // stop look clean, nor keep the node's name on a dead process for long.
    const deadline = setTimeout(() => {
      log.error({ afterMs: STOP_BUDGET_MS }, 'stopping is taking too long; exiting without finishing')
      process.exit(1)
    }, STOP_BUDGET_MS)
    deadline.unref()
    await busy
    await close()
    clearTimeout(deadline)
    log.info({ ms: Date.now() - began }, 'stopped')
  },
})
