import { randomBytes } from 'node:crypto'
import { existsSync, readdirSync, readFileSync, rmSync } from 'node:fs'
import { mkdir, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { LabError } from '../errors.ts'
import { createLogger, type Logger } from '../log.ts'
import { createConsulClient, type ConsulClient } from '../consul/client.ts'
import { run, type RunOptions, type RunResult } from '../util/exec.ts'
import { processAlive as alive } from '../util/proc.ts'
import { consulUrl, startConsulAgent, startConsulCluster } from './consul-cluster.ts'
import { createNodeToken } from '../consul/acl.ts'
import { createNetwork } from '../mesh/network.ts'
import { kvLayout } from '../mesh/kv-layout.ts'
import { policyScopeFor } from '../services/naming.ts'
import { cliArgv } from './sidecar.ts'
import { startDaemon, waitFor, type Daemon } from './daemon.ts'
import { addLan, buildNetwork, deleteHostLinksSync, type LabLan, killNamespaceProcessesSync, listNamespaces, pidsIn, setCut, teardownNamespacesSync } from './netns.ts'
import { requireConsul } from './provision.ts'
import { DEFAULT_TINC_TIMERS } from '../tinc/setup.ts'
import { LAB_NETNAME, labConfigDir, labEventsDir, sidecarStateDir, tincdArgv, tincPaths, writeManualTincConfigs } from './tinc-manual.ts'
import { DEFAULT_LAB_OPTIONS, findNode, NS_PREFIX, planLab, type LabNodePlan, type LabOptions, type LabPlan } from './topology.ts'

/** The lab's network is made the way `init` makes one: scoped service names, and node tokens that may write only those. */
const LAB_SERVICE_NAMES = 'scoped' as const

export { LAB_NETNAME }

/** What `lab up` leaves on disk so later `lab exec/cut/heal/down` commands (other processes) can find the lab. */
export interface LabState {
  plan: LabPlan
  runDir: string
  /** The process that tears the lab down when it exits; 0 for a lab kept by `lab up`. */
  ownerPid: number
  managementToken: string | undefined
  agentToken: string | undefined
  /** Per-node sidecar tokens (ACL mode): each may write only its own record. */
  nodeTokens: Record<string, string>
  consulBin: string
  pids: number[]
  createdAt: string
  /** LANs behind nodes made by addLan, by name ("lan1" → its namespace). */
  lans?: Record<string, string>
}

/**
 * How long a fresh lab mesh may take to ping all round. Nodes that start together connect to
 * every hub at once, and tinc 1.0 can come out of that burst holding a peer's stale session
 * key, dropping its packets until the key expires (docs/joining.md): KeyExpire, plus time for
 * the meta connections. Seen in the services lab, twice in about 40 starts: a 57 s wait, in
 * which (at debug level 5) node3 dropped node1's packets as unauthenticated for 44 s, until
 * node1's first key renewal.
 */
export const MESH_WAIT_MS = (DEFAULT_TINC_TIMERS.keyExpire + 30) * 1000

export interface Lab {
  readonly state: LabState
  /** A Consul client for a node's or server's agent, through the host link; management token by default. */
  consul(name: string, opts?: { token?: string | null }): ConsulClient
  exec(node: string, argv: string[], opts?: Omit<RunOptions, 'netns'>): Promise<RunResult>
  /** The namespace for a node, NAT router ("nat1"), Consul server ("consul1") or "hub". */
  nsOf(name: string): string
  cut(a: string, b: string): Promise<void>
  heal(a: string, b: string): Promise<void>
  /** Waits until every node pings every other node over tinc (by default up to MESH_WAIT_MS). */
  waitForMesh(timeoutMs?: number): Promise<void>
  /** Creates the network the sidecars wait for, through the same writer as `tinc-consul init`. */
  writeNetwork(): Promise<void>
  /** Starts `tinc-consul run` in a node's namespace, with that node's own token in ACL mode; `env` adds settings (TINC_CONSUL_*). */
  startSidecar(node: string, opts?: { env?: NodeJS.ProcessEnv }): Promise<Daemon>
  /** Kills every process in a node's namespace: tincd, its Consul agent, its sidecar. */
  stopNode(node: string): void
  restartTincd(node: string): Promise<void>
  /**
   * Restarts a node's Consul client agent. With `forgetServices`, its saved services and
   * checks are deleted first: an agent that comes back knowing nothing (a new data dir).
   */
  restartConsulAgent(node: string, opts?: { forgetServices?: boolean }): Promise<void>
  /** Starts a background process in a node's namespace (a test's listener); teardown kills it. */
  spawn(node: string, name: string, argv: string[], opts?: { env?: NodeJS.ProcessEnv }): Promise<Daemon>
  /** Kills one process started by spawn, and waits until it is gone. */
  kill(d: Daemon): Promise<void>
  /** The node's services directory, where `run` looks for definitions. */
  servicesDir(node: string): string
  stopConsulServer(name: string): void
  startConsulServer(name: string): Promise<void>
  /** A LAN with one host behind a node (netns.ts addLan); lab.exec reaches the host by the LAN's name. Torn down with the lab. */
  addLan(node: string, cidr: string, opts: { routeBack: boolean }): Promise<LabLan>
  /** Paths of a node's tinc files. */
  tincFiles(node: string): { root: string; dir: string; pidFile: string; logFile: string }
  /** The node's stand-ins for /etc/tinc, /etc/tinc-consul and /run/tinc-consul, as init/join flags. */
  setupFlags(node: string): string[]
  /**
   * Runs `tinc-consul ARGS` inside a node's namespace. A lab node shares this machine's
   * file system and systemd, so join and init there install nothing
   * (TINC_CONSUL_NO_INSTALL=1) unless `env` says otherwise, with --root pointing elsewhere.
   */
  cli(node: string, args: string[], opts?: { env?: NodeJS.ProcessEnv; allowFailure?: boolean; timeoutMs?: number }): Promise<RunResult>
  down(): void
}

export function labRoot(env: NodeJS.ProcessEnv = process.env): string {
  return env.TINC_CONSUL_LAB_DIR ?? '/run/tinc-consul-lab'
}

const LAB_NS_RE = new RegExp(`^${NS_PREFIX}[0-9a-f]{4,8}-`)
const HOST_LINK_RE = new RegExp(`^${NS_PREFIX}[0-9a-f]{4,8}-h$`)

export function readLabStates(root = labRoot()): LabState[] {
  if (!existsSync(root)) return []
  const states: LabState[] = []
  for (const entry of readdirSync(root)) {
    const file = join(root, entry, 'state.json')
    try {
      states.push(JSON.parse(readFileSync(file, 'utf8')) as LabState)
    } catch {
      // A lab that died before writing its state is found again by namespace prefix.
    }
  }
  return states
}

function teardownState(state: LabState): string[] {
  const prefix = `${state.plan.prefix}-`
  const namespaces = listNamespaces().filter((ns) => ns.startsWith(prefix))
  const problems = teardownNamespacesSync(namespaces, state.pids)
  deleteHostLinksSync(new RegExp(`^${state.plan.hostIf}$`))
  rmSync(state.runDir, { recursive: true, force: true })
  return problems
}

/**
 * Tears down labs: the given one, or every lab on the machine (kept ones,
 * stale ones, and namespaces with our prefix that no state file accounts for).
 */
export function labDown(opts: { id?: string; root?: string } = {}): { removed: string[]; problems: string[] } {
  const root = opts.root ?? labRoot()
  const removed: string[] = []
  const problems: string[] = []
  for (const state of readLabStates(root)) {
    if (opts.id && state.plan.id !== opts.id) continue
    problems.push(...teardownState(state))
    removed.push(state.plan.id)
  }
  if (!opts.id) {
    const orphans = listNamespaces().filter((ns) => LAB_NS_RE.test(ns))
    if (orphans.length) {
      problems.push(...teardownNamespacesSync(orphans))
      deleteHostLinksSync(HOST_LINK_RE)
      removed.push(...new Set(orphans.map((ns) => ns.slice(NS_PREFIX.length).split('-')[0] ?? '')))
    }
    // Run dirs without a state file come from a lab that failed before writing it.
    if (existsSync(root)) for (const entry of readdirSync(root)) if (entry.startsWith(NS_PREFIX)) rmSync(join(root, entry), { recursive: true, force: true })
  }
  return { removed: [...new Set(removed)], problems }
}

/** Removes labs whose owning process is gone (a test run killed before its teardown). */
export function pruneStaleLabs(root = labRoot()): string[] {
  const pruned: string[] = []
  for (const state of readLabStates(root)) {
    if (state.ownerPid !== 0 && !alive(state.ownerPid)) {
      teardownState(state)
      pruned.push(state.plan.id)
    }
  }
  const known = new Set(readLabStates(root).map((s) => `${s.plan.prefix}-`))
  const orphans = listNamespaces().filter((ns) => LAB_NS_RE.test(ns) && ![...known].some((p) => ns.startsWith(p)))
  if (orphans.length) {
    teardownNamespacesSync(orphans)
    const prefixes = new Set(orphans.map((ns) => ns.slice(0, ns.indexOf('-'))))
    deleteHostLinksSync(new RegExp(`^(${[...prefixes].join('|')})-h$`))
  }
  return pruned
}

export interface LabUpOptions extends Partial<LabOptions> {
  /** Leave the lab running when this process exits (the `lab up` command). */
  keep?: boolean
  step?: (msg: string) => void
  root?: string
  consulBin?: string
  log?: Logger
}

async function saveState(state: LabState): Promise<void> {
  await writeFile(join(state.runDir, 'state.json'), JSON.stringify(state, null, 2), { mode: 0o600 })
}

/** A process's command name; undefined once it has exited (a short-lived process listed a moment ago). */
function commOf(pid: number): string | undefined {
  try {
    return readFileSync(`/proc/${pid}/comm`, 'utf8').trim()
  } catch {
    return undefined
  }
}

/** A LAN behind a node, remembered in the state so `lab.exec` finds it; its namespace has the lab's prefix, so teardown removes it. */
async function addLabLan(state: LabState, node: string, cidr: string, opts: { routeBack: boolean }): Promise<LabLan> {
  const lan = await addLan(state.plan, findNode(state.plan, node), Object.keys(state.lans ?? {}).length + 1, cidr, opts)
  state.lans = { ...state.lans, [lan.name]: lan.ns }
  await saveState(state)
  return lan
}

/** The namespace of a node, a NAT router ("nat1"), a Consul server, a LAN ("lan1") or "hub". */
function labNsOf(state: LabState, name: string): string {
  const { plan } = state
  if (name === 'hub') return plan.hubNs
  const server = plan.servers.find((s) => s.name === name)
  if (server) return server.ns
  const router = plan.nodes.find((n) => n.router && n.router.ns === `${plan.prefix}-${name}`)
  if (router?.router) return router.router.ns
  return state.lans?.[name] ?? findNode(plan, name).ns
}

/** Waits until every node pings every other node over tinc. */
async function waitForLabMesh(plan: LabPlan, timeoutMs: number): Promise<void> {
  const pairs = plan.nodes.flatMap((a) => plan.nodes.filter((b) => b !== a).map((b) => [a, b] as const))
  await Promise.all(
    pairs.map(([a, b]) =>
      waitFor(`${a.name} to ping ${b.name} (${b.vpnIp}) over tinc`, async () => ((await run(['ping', '-c1', '-W1', b.vpnIp], { netns: a.ns, allowFailure: true })).code === 0 ? true : undefined), {
        timeoutMs,
      }),
    ),
  )
}

/** `tinc-consul run` for a lab node: its own stand-ins for /etc/tinc, the state and run directories, its tincd's pidfile and log. */
function sidecarArgv(state: LabState, node: LabNodePlan): string[] {
  const files = tincPaths(state.runDir, node)
  return [
    ...cliArgv(),
    'run',
    '--net',
    LAB_NETNAME,
    '--dir',
    files.root,
    '--state-dir',
    sidecarStateDir(state.runDir, node),
    '--pidfile',
    files.pidFile,
    '--consul',
    'http://127.0.0.1:8500',
    '--config-dir',
    labConfigDir(state.runDir, node.name),
    '--run-dir',
    labEventsDir(state.runDir, node.name),
    '--tinc-log',
    files.logFile,
  ]
}

/** A client for a node's or server's agent: the management token unless `token` says otherwise (null: none). */
function labConsul(state: LabState, name: string, token: string | null | undefined): ConsulClient {
  const ip = state.plan.servers.find((s) => s.name === name)?.controlIp ?? findNode(state.plan, name).controlIp
  return createConsulClient({ url: consulUrl(ip), token: token === null ? undefined : (token ?? state.managementToken), timeoutMs: 10_000 })
}

function makeLab(state: LabState): Lab {
  const { plan } = state
  let isDown = false
  const track = async (d: Daemon) => {
    state.pids.push(d.pid)
    await saveState(state)
    return d
  }
  const nsOf = (name: string): string => labNsOf(state, name)
  const lab: Lab = {
    state,
    nsOf,
    consul: (name, opts = {}) => labConsul(state, name, opts.token),
    exec: (node, argv, opts = {}) => run(argv, { ...opts, netns: nsOf(node) }),
    cut: (a, b) => setCut(findNode(plan, a), findNode(plan, b), true),
    heal: (a, b) => setCut(findNode(plan, a), findNode(plan, b), false),
    waitForMesh: (timeoutMs = MESH_WAIT_MS) => waitForLabMesh(plan, timeoutMs),
    async writeNetwork() {
      const record = { v: 1 as const, cidr: plan.options.vpnCidr, domain: 'mesh', createdAt: new Date().toISOString(), serviceNames: LAB_SERVICE_NAMES }
      await createNetwork(lab.consul(plan.nodes[0]?.name ?? 'node1'), kvLayout(LAB_NETNAME), record)
    },
    async startSidecar(name, opts) {
      const node = findNode(plan, name)
      const argv = sidecarArgv(state, node)
      // The token goes through the environment, not argv, where any user could read it.
      // Nodes set up by init/join have their token in their own config file instead.
      const token = state.nodeTokens[name]
      const env = { ...process.env, ...(token ? { TINC_CONSUL_TOKEN: token } : {}), TINC_CONSUL_LOG_LEVEL: process.env.TINC_CONSUL_LOG_LEVEL ?? 'info', ...opts?.env }
      return track(startDaemon(`sidecar ${name}`, node.ns, argv, join(state.runDir, name, 'sidecar.log'), env))
    },
    stopNode(name) {
      killNamespaceProcessesSync([findNode(plan, name).ns])
    },
    async restartTincd(name) {
      const node = findNode(plan, name)
      const files = tincPaths(state.runDir, node)
      const pids = pidsIn(node.ns).filter((pid) => commOf(pid) === 'tincd')
      killNamespaceProcessesSync([], pids)
      await track(startDaemon(`tincd ${name}`, node.ns, tincdArgv(files, LAB_NETNAME), join(state.runDir, name, 'tincd.out')))
    },
    async restartConsulAgent(name, opts = {}) {
      const node = findNode(plan, name)
      const pids = pidsIn(node.ns).filter((pid) => commOf(pid) === 'consul')
      killNamespaceProcessesSync([], pids)
      if (opts.forgetServices) for (const d of ['services', 'checks']) rmSync(join(state.runDir, name, 'consul-data', d), { recursive: true, force: true })
      const d = await track(startConsulAgent(state.consulBin, state.runDir, name, node.ns))
      await waitFor(`${name}'s agent to rejoin`, async () => (await lab.consul(name).leader()) || undefined, { timeoutMs: 60_000, daemons: [d] })
    },
    spawn: (name, label, argv, opts = {}) => track(startDaemon(label, findNode(plan, name).ns, argv, join(state.runDir, name, `${label.replace(/[^A-Za-z0-9_.-]/g, '_')}.log`), opts.env)),
    async kill(d) {
      killNamespaceProcessesSync([], [d.pid])
      await waitFor(`${d.name} to exit`, async () => (alive(d.pid) ? undefined : true), { timeoutMs: 10_000, intervalMs: 50 })
    },
    servicesDir: (name) => join(labConfigDir(state.runDir, findNode(plan, name).name), `${LAB_NETNAME}.services.d`),
    stopConsulServer(name) {
      const server = plan.servers.find((s) => s.name === name)
      if (!server) throw new LabError('LAB_NO_SERVER', `no Consul server "${name}"`)
      killNamespaceProcessesSync([server.ns])
    },
    async startConsulServer(name) {
      const server = plan.servers.find((s) => s.name === name)
      if (!server) throw new LabError('LAB_NO_SERVER', `no Consul server "${name}"`)
      const d = await track(startConsulAgent(state.consulBin, state.runDir, name, server.ns))
      await waitFor(`${name} to rejoin a cluster with a leader`, async () => (await lab.consul(name).leader()) || undefined, { timeoutMs: 60_000, daemons: [d] })
    },
    addLan: (node, cidr, opts) => addLabLan(state, node, cidr, opts),
    tincFiles: (name) => tincPaths(state.runDir, findNode(plan, name)),
    setupFlags: (name) => ['--dir', tincPaths(state.runDir, findNode(plan, name)).root, '--config-dir', labConfigDir(state.runDir, name), '--run-dir', labEventsDir(state.runDir, name)],
    cli: (name, args, opts = {}) =>
      run([...cliArgv(), ...args], { netns: nsOf(name), env: { TINC_CONSUL_NO_INSTALL: '1', ...(opts.env ?? process.env) }, allowFailure: opts.allowFailure, timeoutMs: opts.timeoutMs ?? 120_000 }),
    down() {
      if (isDown) return
      isDown = true
      const problems = teardownState(state)
      if (problems.length) throw new LabError('LAB_TEARDOWN', `lab ${plan.id} teardown left problems:\n${problems.join('\n')}`)
    },
  }
  return lab
}

/** Opens a running lab by id, or the only one on the machine. */
export function openLab(id?: string, root = labRoot()): Lab {
  const states = readLabStates(root).filter((s) => !id || s.plan.id === id)
  if (states.length === 0) throw new LabError('LAB_NONE', id ? `no lab with id ${id}; see \`tinc-consul lab status\`` : 'no lab is up; start one with `tinc-consul lab up`')
  if (states.length > 1) throw new LabError('LAB_AMBIGUOUS', `several labs are up (${states.map((s) => s.plan.id).join(', ')}); pass --id`)
  return makeLab(states[0] as LabState)
}

function requireRoot(): void {
  if (process.getuid?.() !== 0) throw new LabError('LAB_NOT_ROOT', 'the lab creates network namespaces and needs root; run it with sudo')
  if (!existsSync('/dev/net/tun')) throw new LabError('LAB_NO_TUN', '/dev/net/tun is missing; tincd needs the tun driver (modprobe tun)')
}

/**
 * Builds a lab: namespaces and links, hand-written tinc configs and tincd on
 * every node (unless tinc is off), and a Consul cluster. Any failure or signal
 * during start-up tears down everything built so far. Unless `keep` is set, the
 * lab is also torn down when this process exits.
 */
export async function labUp(opts: LabUpOptions = {}): Promise<Lab> {
  requireRoot()
  const root = opts.root ?? labRoot()
  const step = opts.step ?? (() => {})
  const consulBin = opts.consulBin ?? (await requireConsul())
  pruneStaleLabs(root)
  const running = readLabStates(root)
  if (running.length > 0) {
    throw new LabError('LAB_BUSY', `lab ${running.map((s) => s.plan.id).join(', ')} is already up and labs share the host link address; run \`tinc-consul lab down\` first`)
  }
  const options: LabOptions = { ...DEFAULT_LAB_OPTIONS, ...Object.fromEntries(Object.entries(opts).filter(([k, v]) => v !== undefined && k in DEFAULT_LAB_OPTIONS)) }
  const plan = planLab(randomBytes(2).toString('hex'), options)
  const log = (opts.log ?? createLogger()).child({ component: 'lab', lab: plan.id })
  const runDir = join(root, plan.prefix)
  const state: LabState = { plan, runDir, ownerPid: process.pid, managementToken: undefined, agentToken: undefined, nodeTokens: {}, consulBin, pids: [], createdAt: new Date().toISOString() }
  const lab = makeLab(state)
  const daemons: Daemon[] = []
  const save = async () => {
    state.pids = daemons.map((d) => d.pid)
    log.debug({ pids: state.pids, runDir }, 'lab state saved')
    await saveState(state)
  }
  const onSignal = (sig: NodeJS.Signals) => {
    lab.down()
    process.exit(sig === 'SIGINT' ? 130 : 143)
  }
  const onExit = () => lab.down()
  process.on('SIGINT', onSignal)
  process.on('SIGTERM', onSignal)
  process.on('exit', onExit)
  try {
    await mkdir(runDir, { recursive: true, mode: 0o700 })
    await save()
    step(`lab ${plan.id}: ${plan.nodes.length} nodes (${options.nat} behind NAT), ${plan.servers.length} Consul server(s)${options.acl ? ', ACLs on' : ''}`)
    await buildNetwork(plan)
    step('namespaces, bridges and NAT routers are up')
    if (options.tinc) {
      await writeManualTincConfigs(plan, runDir)
      for (const node of plan.nodes) {
        daemons.push(startDaemon(`tincd ${node.name}`, node.ns, tincdArgv(tincPaths(runDir, node), LAB_NETNAME), join(runDir, node.name, 'tincd.out')))
      }
      await save()
      step('tincd started on every node with hand-written host files')
    }
    if (plan.servers.length) {
      const info = await startConsulCluster(plan, runDir, consulBin, daemons, step)
      state.managementToken = info.managementToken
      state.agentToken = info.agentToken
    }
    if (options.acl) {
      const admin = lab.consul(plan.servers[0]?.name ?? 'consul1')
      const scope = policyScopeFor(kvLayout(LAB_NETNAME), LAB_NETNAME, { serviceNames: LAB_SERVICE_NAMES })
      for (const node of plan.nodes) state.nodeTokens[node.name] = (await createNodeToken(admin, scope, node.name)).secretId
      step('one ACL token per node: each may write only its own record')
    }
    if (opts.keep) state.ownerPid = 0
    await save()
    return lab
  } catch (err) {
    log.warn({ err }, 'lab start-up failed; tearing down what was built')
    lab.down()
    throw err
  } finally {
    process.off('SIGINT', onSignal)
    process.off('SIGTERM', onSignal)
    if (opts.keep) process.off('exit', onExit)
    else {
      // Still owned by this process: tear down on signals too, not just on a clean exit.
      process.once('SIGINT', onSignal)
      process.once('SIGTERM', onSignal)
    }
  }
}
