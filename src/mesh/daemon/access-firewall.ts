import { TincConsulError } from '../../errors.ts'
import type { Logger } from '../../log.ts'
import { isNetName } from '../kv-layout.ts'
import { isInterfaceName } from '../../tinc/setup.ts'
import { isCanonicalRoute } from '../route-cidr.ts'
import { compilePolicy, type AccessPolicy, type CompiledPolicy, type Group } from '../access-policy.ts'
import { dropTableLines, loadNftScript } from './nft.ts'

/**
 * Enforcement of who may talk to whom (docs/groups.md, src/mesh/access-policy.ts) in the kernel.
 * Each node filters what arrives on its own tinc interface: a packet from a node outside the
 * groups this node may reach is dropped here, at the receiver, so a node that runs no sidecar (or
 * a tampered one) can't open the mesh for anyone else. The rules live in a table of our own,
 * `inet tinc-consul-<net>-access` (both IP families in one table, apart from the masquerade table
 * `ip tinc-consul-<net>`), and every change replaces the whole table in one `nft -f` transaction,
 * so there is never a moment with half a policy.
 *
 * tinc 1.0 in router mode doesn't check that a packet's source address is one of the sending
 * peer's subnets, so the table trusts the source address a peer claims (docs/groups.md).
 */
export const accessTable = (net: string): string => `tinc-consul-${net}-access`

/** The script that leaves no access table, whether or not there was one. */
const removeScript = (table: string): string => `${dropTableLines('inet', table).join('\n')}\n`

/**
 * Consul's ports between agents, as consul/server.hcl.tmpl and consul/client.hcl.tmpl set them:
 * server RPC (TCP 8300) and LAN gossip (Serf, TCP and UDP 8301). WAN gossip (8302) is turned off
 * on servers (`serf_wan = -1`) and clients never listen on it; gRPC is off; HTTP and DNS listen on
 * loopback. Gossip must reach every agent whatever the groups say, or Consul marks nodes failed.
 */
export const CONSUL_PORTS: Readonly<{ tcp: readonly number[]; udp: readonly number[] }> = { tcp: [8300, 8301], udp: [8301] }

export interface AccessInput {
  /** The tinc interface: `Interface` in tinc.conf, else `tinc-<net>` (interfaceOf in src/tinc/setup.ts reads it). */
  iface: string
  policy: AccessPolicy
  /** This node's IPv4 VPN address: its group (ownGroup) decides what it may be reached from. */
  selfAddress: string
  /**
   * An earlier run loaded a table that no removal has taken away since (the follower's marker).
   * A removal that fails then leaves that table dropping what the policy now allows: a failure,
   * retried, not the warning a node that never had a table gets.
   */
  tableLeft?: boolean
  consulPorts?: { tcp: readonly number[]; udp: readonly number[] }
}

/** What the policy means for this node: nothing to filter, or the groups (and their ranges) it may be reached from. */
export type AccessPlan = { open: true; why: string } | { open: false; group: string | undefined; groups: string[]; cidrs4: string[]; cidrs6: string[] }

/**
 * This node's group: the one whose `cidr` holds its IPv4 VPN address ("Membership is the address"
 * in docs/groups.md). The table, DNS and status all ask this, so they agree on one group; an IPv6
 * address in another group's `cidr6` places the node nowhere (`group ls` reports such a node).
 */
export function ownGroup(policy: CompiledPolicy, vpnAddress: string | undefined): Group | undefined {
  // groupOf would look an IPv6 address up among the cidr6 ranges.
  return vpnAddress?.includes(':') ? undefined : policy.groupOf(vpnAddress)
}

export function accessPlan(policy: AccessPolicy, selfAddress: string): AccessPlan {
  checkRanges(policy)
  if (policy.groups.length === 0) return { open: true, why: 'the network has no groups: every node may reach every node' }
  const compiled = compilePolicy(policy)
  const self = ownGroup(compiled, selfAddress)
  // mayReach: an infrastructure node is reached by every node, those in no group included, whose
  // addresses no group CIDR lists; so there is nothing to drop, and a table would only get in the way.
  if (self?.infra) return { open: true, why: `this node is in the infrastructure group ${self.name}, which every node may reach` }
  const names = compiled.reachableGroups(self?.name)
  const allowed: Group[] = policy.groups.filter((g) => names.has(g.name))
  return {
    open: false,
    group: self?.name,
    groups: allowed.map((g) => g.name).sort(),
    cidrs4: allowed.map((g) => g.cidr),
    cidrs6: allowed.flatMap((g) => (g.cidr6 === undefined ? [] : [g.cidr6])),
  }
}

function refuse(message: string): never {
  throw new TincConsulError('ACCESS_FIREWALL_INPUT', message)
}

/** Every group's ranges, before ownGroup parses them (it throws on a malformed one) and before they go into a script. */
function checkRanges(policy: AccessPolicy): void {
  for (const g of policy.groups) {
    if (!isCanonicalRoute(g.cidr) || g.cidr.includes(':')) refuse(`group ${JSON.stringify(g.name)}: ${JSON.stringify(g.cidr)} is not a canonical IPv4 CIDR`)
    if (g.cidr6 !== undefined && (!isCanonicalRoute(g.cidr6) || !g.cidr6.includes(':'))) refuse(`group ${JSON.stringify(g.name)}: ${JSON.stringify(g.cidr6)} is not a canonical IPv6 CIDR`)
  }
}

/**
 * Everything that goes into the script is checked here, although groups.ts checked the policy
 * already: the policy comes from Consul, and a string that reaches nft unchecked could add rules.
 */
function checkInput(net: string, input: AccessInput, plan: AccessPlan): void {
  if (!isNetName(net)) refuse(`${JSON.stringify(net)} is not a network name`)
  if (!isInterfaceName(input.iface)) refuse(`${JSON.stringify(input.iface)} is not an interface name (letters, digits, "_", "." and "-", at most 15)`)
  if (plan.open) return
  const ports = input.consulPorts ?? CONSUL_PORTS
  for (const p of [...ports.tcp, ...ports.udp]) if (!Number.isInteger(p) || p < 1 || p > 65535) refuse(`${JSON.stringify(p)} is not a port`)
}

const list = (xs: readonly (string | number)[]): string => (xs.length === 1 ? String(xs[0]) : `{ ${xs.join(', ')} }`)

/** The rules of one chain, every one limited to packets that came in on the tinc interface. */
function chainRules(iface: string, plan: AccessPlan & { open: false }, ports: { tcp: readonly number[]; udp: readonly number[] }): string[] {
  const on = `iifname "${iface}"`
  const rules = [
    `${on} ct state established,related accept`,
    // Before the invalid drop: conntrack leaves neighbour discovery untracked, and without it IPv6
    // on the interface stops working. Hop limit 255 means it came from the link itself.
    `${on} icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit, nd-router-advert } ip6 hoplimit 255 accept`,
    `${on} ct state invalid drop`,
  ]
  // An anonymous set can't be empty in nft's syntax: no range, no rule.
  if (plan.cidrs4.length > 0) rules.push(`${on} ip saddr ${list(plan.cidrs4)} accept`)
  if (plan.cidrs6.length > 0) rules.push(`${on} ip6 saddr ${list(plan.cidrs6)} accept`)
  if (ports.tcp.length > 0) rules.push(`${on} tcp dport ${list(ports.tcp)} accept`)
  if (ports.udp.length > 0) rules.push(`${on} udp dport ${list(ports.udp)} accept`)
  rules.push(`${on} counter drop`)
  return rules
}

/**
 * The nft script that makes the table hold exactly this node's rules, or not exist when there is
 * nothing to filter. Pure. Throws ACCESS_FIREWALL_INPUT for an interface name or range that isn't
 * safe to hand to nft.
 */
export function accessScript(o: { net: string } & AccessInput): string {
  return planScript(o.net, o, accessPlan(o.policy, o.selfAddress))
}

/** accessScript for a plan already made from this input. */
function planScript(net: string, o: AccessInput, plan: AccessPlan): string {
  const table = accessTable(net)
  checkInput(net, o, plan)
  if (plan.open) return removeScript(table)
  const rules = chainRules(o.iface, plan, o.consulPorts ?? CONSUL_PORTS).map((r) => `    ${r}`)
  const chain = (hook: 'input' | 'forward') => [`  chain ${hook} {`, `    type filter hook ${hook} priority filter; policy accept;`, ...rules, '  }']
  // One transaction: the old table goes and the new one comes, or nothing changes.
  return [
    removeScript(table).trimEnd(),
    `table inet ${table} {`,
    `  comment "managed by tinc-consul: who may reach this node over ${o.iface} (docs/groups.md); rewritten on every policy change"`,
    // forward too: a node routing a LAN behind it (docs/subnets.md) filters what goes there.
    ...chain('input'),
    ...chain('forward'),
    '}',
    '',
  ].join('\n')
}

export interface AccessFirewallState {
  /** off: the operator turned enforcement off; open: nothing to filter; enforced: the table is loaded; failed: it couldn't be. */
  mode: 'off' | 'open' | 'enforced' | 'failed'
  table: string
  reason?: string
  /** When the mode (or, while failed, the reason) last changed, ISO 8601. */
  since: string
  /** The groups this node may be reached from, when enforced. */
  allowedGroups?: string[]
  /** Failed while removing the table of an earlier policy: it still drops what this node may now be reached from. */
  stale?: true
}

export interface AccessFirewall {
  /** Makes the table match; nft runs only when the script differs from the last one loaded. Never throws. */
  apply(input: AccessInput): Promise<void>
  state(): AccessFirewallState
  /** Whether our table is in the kernel: true after a load, false after a removal that worked, undefined while not known. */
  loaded(): boolean | undefined
  /**
   * Stops the retry timer. The table stays: a sidecar that stops (or restarts, or crashes) must
   * not open the mesh; the next start replaces it.
   */
  stop(): void
}

export interface AccessFirewallOptions {
  net: string
  log: Logger
  nft?: (script: string) => Promise<void>
  /** False: the operator turned enforcement off; the table is removed and never loaded. */
  enforce: boolean
  /** How often a failed load is retried; 30 s. */
  retryMs?: number
  now?: () => Date
}

/** What to tell the operator: the usual causes get a plain sentence, anything else nft's own words. */
export function describeNftFailure(err: unknown): string {
  const message = err instanceof Error ? err.message : String(err)
  const stderr = err instanceof Error && 'stderr' in err && typeof err.stderr === 'string' ? err.stderr : ''
  if (err instanceof TincConsulError && err.code === 'ACCESS_FIREWALL_INPUT') return `refused the policy: ${message}`
  if (/cannot run nft\b.*ENOENT/.test(message)) return 'nft is not installed (the nftables package)'
  if (/Operation not permitted|EPERM/.test(`${message}\n${stderr}`)) return 'not allowed to change nftables: the sidecar must run as root (CAP_NET_ADMIN)'
  return `nft refused the rules: ${message}`
}

/** A failure is logged at once, and again when its reason or level changes or (errors) every 5 minutes while it lasts. */
const RELOG_MS = 5 * 60_000

function failureLog(log: Logger, table: string, now: () => Date) {
  let last: { reason: string; level: 'warn' | 'error'; at: number } | undefined
  return {
    report(level: 'warn' | 'error', err: unknown, reason: string, message: string): void {
      const t = now().getTime()
      if (last?.reason === reason && last.level === level && (level === 'warn' || t - last.at < RELOG_MS)) return
      last = { reason, level, at: t }
      log[level]({ err, table, reason }, message)
    },
    reset: (): void => void (last = undefined),
  }
}

/** The state a loaded script stands for. */
function loadedState(plan: AccessPlan): Omit<AccessFirewallState, 'table' | 'since'> {
  if (plan.open) return { mode: 'open', reason: plan.why }
  const reason = plan.group === undefined ? { reason: 'this node is in no group: only infrastructure groups may reach it' } : {}
  return { mode: 'enforced', allowedGroups: plan.groups, ...reason }
}

/** Enforcement off: takes away a table an earlier run left, and says what that means. True when the table is gone. */
async function removeForOff(o: AccessFirewallOptions, nft: (script: string) => Promise<void>, table: string, groups: number): Promise<boolean> {
  if (groups > 0) o.log.warn({ table }, 'access enforcement is off (operator choice): this node accepts traffic from every node whatever the groups say')
  try {
    await nft(removeScript(table))
    return true
  } catch (err) {
    o.log.warn({ err, table, reason: describeNftFailure(err) }, 'enforcement is off, and the access table (if an earlier run left one) could not be removed')
    return false
  }
}

/** The status the keeper reports; `since` moves only when the mode or the reason does. */
function stateCell(table: string, now: () => Date, first: Omit<AccessFirewallState, 'table' | 'since'>) {
  let current: AccessFirewallState = { ...first, table, since: now().toISOString() }
  return {
    get: (): AccessFirewallState => current,
    set(next: Omit<AccessFirewallState, 'table' | 'since'>): void {
      const same = next.mode === current.mode && next.reason === current.reason
      current = { ...next, table, since: same ? current.since : now().toISOString() }
    },
  }
}

/** A retry timer that runs while a load has failed; unref'd, so it never keeps the process alive. */
function retryTimer(ms: number, fn: () => void) {
  let timer: ReturnType<typeof setInterval> | undefined
  return {
    on(): void {
      if (timer) return
      timer = setInterval(fn, ms)
      timer.unref()
    },
    off(): void {
      if (timer) clearInterval(timer)
      timer = undefined
    },
  }
}

/**
 * A load that failed: the failed state, a loud error and the retry timer; but only a warning when
 * nothing needs filtering and no table is known to be there.
 */
function reportFailure(c: {
  err: unknown
  plan: AccessPlan | undefined
  /** A table is known to be in the kernel: loaded by this process, or left by an earlier run. */
  tableLeft: boolean
  table: string
  retryMs: number
  failures: ReturnType<typeof failureLog>
  state: ReturnType<typeof stateCell>
  timer: ReturnType<typeof retryTimer>
  stopped: boolean
}): void {
  const reason = describeNftFailure(c.err)
  const retrying = `retrying every ${Math.round(c.retryMs / 1000)} s`
  // Nothing to enforce, no table known, and nft can't run (not installed, no CAP_NET_ADMIN): a
  // table nobody knows of is all that could be wrong, so a warning, not a failure every node repeats.
  if (c.plan?.open && !c.tableLeft) {
    c.failures.report('warn', c.err, reason, 'could not remove a stale access table, if there is one; nothing needs filtering')
    c.timer.off()
    return c.state.set({ mode: 'open', reason: `${c.plan.why} (removing a stale table failed: ${reason})` })
  }
  // The table of an earlier policy stays, dropping what the policy now allows: as loud as a load that failed.
  const [why, message] = c.plan?.open
    ? [
        `could not remove the access table of an earlier policy, which still drops what this node may now be reached from: ${reason}`,
        `ACCESS TABLE NOT REMOVED: nftables table ${c.table} stays (${reason}); ${retrying}`,
      ]
    : [reason, `ACCESS POLICY NOT ENFORCED: could not load nftables table ${c.table} (${reason}); the rules loaded before, if any, stay; ${retrying}`]
  c.state.set({ mode: 'failed', reason: why, ...(c.plan?.open ? { stale: true as const } : {}) })
  c.failures.report('error', c.err, why, message)
  if (!c.stopped) c.timer.on()
}

/**
 * Keeps the access table equal to the policy. Loads are serialized and always use the newest
 * input, so a retry never puts back an older policy. While a load has failed the table loaded
 * before (if any) stays, and a timer retries, since nothing else may call apply for hours.
 */
export function accessFirewall(o: AccessFirewallOptions): AccessFirewall {
  // The table name goes into every script, the removal ones too, which accessScript doesn't check.
  if (!isNetName(o.net)) refuse(`${JSON.stringify(o.net)} is not a network name`)
  const table = accessTable(o.net)
  const nft = o.nft ?? loadNftScript
  const now = o.now ?? (() => new Date())
  const retryMs = o.retryMs ?? 30_000
  // The script last loaded. undefined: not known; a previous process may have left a table, so the first apply always loads.
  let applied: string | undefined
  let loaded: boolean | undefined
  // The script whose load failed last. Only the retry timer runs it again: the daemon applies at
  // every change of the view, and while nft can't load, each apply would spawn nft (and wait up to
  // its timeout) for the same answer.
  let failed: string | undefined
  let input: AccessInput | undefined
  let queue: Promise<void> = Promise.resolve()
  let stopped = false
  let offDone = false
  const failures = failureLog(o.log, table, now)
  const state = stateCell(table, now, o.enforce ? { mode: 'open', reason: 'no policy applied yet' } : { mode: 'off', reason: 'enforcement turned off by the operator' })
  const enqueue = (job: () => Promise<void>): Promise<void> => (queue = queue.then(job, job))
  const timer = retryTimer(retryMs, () => void enqueue(() => attempt(true)))

  const fail = (err: unknown, plan: AccessPlan | undefined, tableLeft: boolean): void => reportFailure({ err, plan, tableLeft, table, retryMs, failures, state, timer, stopped })

  const attempt = async (retry = false): Promise<void> => {
    if (stopped || !input) return
    const i = input
    if (!o.enforce) {
      if (offDone) return
      offDone = true
      if (await removeForOff(o, nft, table, i.policy.groups.length)) loaded = false
      return
    }
    let plan: AccessPlan | undefined
    let script: string | undefined
    try {
      plan = accessPlan(i.policy, i.selfAddress)
      script = planScript(o.net, i, plan)
      if (script === failed && !retry) return
      if (script !== applied) await nft(script)
    } catch (err) {
      failed = script
      return fail(err, plan, loaded === true || i.tableLeft === true)
    }
    const [changed, wasFailed] = [script !== applied, state.get().mode === 'failed']
    applied = script
    loaded = !plan.open
    failed = undefined
    timer.off()
    failures.reset()
    if (wasFailed) o.log.info({ table }, plan.open ? 'access table removed at last: nothing to filter' : 'access table loaded again: the policy is enforced')
    // Unchanged and not failed: the state stands, with any note about a stale table it carries.
    if (changed || wasFailed) state.set(loadedState(plan))
    if (changed) o.log.info({ table, mode: state.get().mode, allowedGroups: state.get().allowedGroups }, plan.open ? 'access table removed: nothing to filter' : 'access table updated')
  }

  return {
    apply(next) {
      input = next
      return enqueue(() => attempt())
    },
    state() {
      // A copy: the status model must not be able to change ours.
      const s = state.get()
      return s.allowedGroups ? { ...s, allowedGroups: [...s.allowedGroups] } : { ...s }
    },
    loaded: () => loaded,
    stop() {
      stopped = true
      timer.off()
    },
  }
}
