import { mkdir, readdir, rm } from 'node:fs/promises'
import { join } from 'node:path'
import { defineCommand } from 'citty'
import { stringify as toToml } from 'smol-toml'
import { agentChecks, agentServices, metaFilter, updateTtlCheck, type AgentCheck, type CheckStatus } from '../consul/agent.ts'
import { createConsulClient } from '../consul/client.ts'
import { catalogServices, passingInstances } from '../consul/health.ts'
import { TincConsulError, UsageError } from '../errors.ts'
import { kvLayout } from '../mesh/kv-layout.ts'
import { readNetwork } from '../mesh/network.ts'
import { parseHealthEntries, serviceFilters, type HealthyEntry } from '../mesh/services.ts'
import { namingFor, type ServiceNaming } from '../services/naming.ts'
import { definitionFrom, DefinitionError, isServiceFile, readDefinition, type ServiceDefinition } from '../services/definition.ts'
import { checkId, META, serviceId } from '../services/registration.ts'
import { writeFileAtomic } from '../util/atomic.ts'
import { consulArgs } from './common.ts'
import { described } from './env.ts'
import { requireNet } from './run.ts'
import { defaultServicesDir, servicesDirArg } from './service-args.ts'
import { table } from './table.ts'

const serviceArgs = {
  ...consulArgs,
  ...servicesDirArg,
  json: { type: 'boolean', description: 'Print JSON instead of a table', default: false },
} as const

interface Common {
  net?: string
  'config-dir': string
  'services-dir'?: string
  consul: string
  token?: string
  prefix?: string
}
const dirOf = (args: Common, net: string) => args['services-dir'] || defaultServicesDir(args['config-dir'], net)
const clientOf = (args: Common) => createConsulClient({ url: args.consul, token: args.token || undefined })
/** How the network names its services in Consul, from its record (src/services/naming.ts). */
const namingOf = async (args: Common, net: string) => namingFor(net, (await readNetwork(clientOf(args), kvLayout(net, args.prefix || undefined))) ?? {})
/** The daemon decides whether script checks run; the commands only need to read such files. */
const READ_ANY = { allowScripts: true }

/** Every value of a repeatable flag (citty keeps only the last), commas splitting too. */
export function repeated(rawArgs: string[], flag: string): string[] {
  const out: string[] = []
  for (let i = 0; i < rawArgs.length; i++) {
    const a = rawArgs[i] ?? ''
    if (a === '--') break
    if (a === `--${flag}`) out.push(rawArgs[++i] ?? '')
    else if (a.startsWith(`--${flag}=`)) out.push(a.slice(flag.length + 3))
  }
  return out
    .flatMap((v) => v.split(','))
    .map((v) => v.trim())
    .filter(Boolean)
}

/** `--check tcp|udp|ttl|http|http:/path` as the file's [check] table. */
export function checkFromFlag(spec: string | undefined, proto: string): Record<string, unknown> {
  const s = spec ?? proto
  if (s === 'tcp' || s === 'udp' || s === 'ttl') return { type: s }
  const http = /^http(?::(\/\S*))?$/.exec(s)
  if (http) return { type: 'http', ...(http[1] ? { path: http[1] } : {}) }
  throw new UsageError('BAD_FLAG', `--check must be tcp, udp, ttl, http or http:/path, got ${JSON.stringify(spec)}`)
}

async function listFiles(dir: string): Promise<string[]> {
  const names = await readdir(dir).catch((err: NodeJS.ErrnoException) => {
    if (err.code === 'ENOENT') return []
    throw new TincConsulError('SERVICES_DIR', `cannot read ${dir}: ${err.message}`, { cause: err })
  })
  return names.filter(isServiceFile).sort()
}

async function readAll(dir: string): Promise<Array<{ file: string; def?: ServiceDefinition; error?: string }>> {
  return Promise.all(
    (await listFiles(dir)).map((file) =>
      readDefinition(join(dir, file), READ_ANY).then(
        (def) => ({ file, def }),
        (err: unknown) => ({ file, error: (err as Error).message }),
      ),
    ),
  )
}

/** Files whose service is NAME: NAME.toml and friends first, else any whose `name` says so. */
async function filesFor(dir: string, name: string): Promise<ServiceDefinition[]> {
  const all = await readAll(dir)
  const byStem = all.filter((e) => e.def?.stem === name).map((e) => e.def as ServiceDefinition)
  return byStem.length ? byStem : all.filter((e) => e.def?.name === name.toLowerCase()).map((e) => e.def as ServiceDefinition)
}

const add = defineCommand({
  meta: { name: 'add', description: 'Write a service definition file; a running daemon registers it within a moment' },
  args: {
    ...serviceArgs,
    name: { type: 'positional', description: 'Service name: one DNS label (it resolves as NAME.service.<domain>)', required: true },
    port: { type: 'string', description: 'Port the service listens on', required: true },
    proto: { type: 'string', description: 'tcp or udp', default: 'tcp' },
    check: { type: 'string', description: 'tcp, udp, ttl, http or http:/path (default: the protocol)' },
    status: { type: 'string', description: 'For http checks: the exact status that means healthy (default: any 2xx)' },
    tag: { type: 'string', description: 'A tag (repeat, or comma-separate); each resolves as TAG.NAME.service.<domain>' },
    meta: { type: 'string', description: 'KEY=VALUE metadata (repeat)' },
    interval: { type: 'string', description: 'Check interval, e.g. 10s' },
    timeout: { type: 'string', description: 'Check timeout, e.g. 2s' },
    ttl: { type: 'string', description: 'For ttl checks: the longest gap between two reports, e.g. 5m' },
    'deregister-after': { type: 'string', description: 'Remove the service after it has been critical this long (default 10m, at least 1m)' },
    force: { type: 'boolean', description: 'Replace an existing file', default: false },
  },
  async run({ args, rawArgs }) {
    const net = requireNet(args.net)
    const dir = dirOf(args, net)
    const port = Number(args.port)
    const check: Record<string, unknown> = checkFromFlag(args.check, args.proto)
    if (args.status !== undefined) check.status = Number(args.status)
    if (args.interval) check.interval = args.interval
    if (args.timeout) check.timeout = args.timeout
    if (args.ttl) check.ttl = args.ttl
    if (args['deregister-after']) check.deregister_critical_after = args['deregister-after']
    const meta: Record<string, string> = {}
    for (const kv of repeated(rawArgs, 'meta')) {
      const eq = kv.indexOf('=')
      if (eq < 1) throw new UsageError('BAD_FLAG', `--meta takes KEY=VALUE, got ${JSON.stringify(kv)}`)
      meta[kv.slice(0, eq)] = kv.slice(eq + 1)
    }
    const tags = repeated(rawArgs, 'tag')
    const data = { name: args.name, port, protocol: args.proto, ...(tags.length ? { tags } : {}), ...(Object.keys(meta).length ? { meta } : {}), check }
    const file = `${args.name}.toml`
    if (!isServiceFile(file)) throw new UsageError('BAD_NAME', `${JSON.stringify(args.name)} can't be a file name; use letters, digits, "-" and "_"`)
    // The same checks the daemon will apply, before anything is written.
    let def: ServiceDefinition
    try {
      def = definitionFrom(data, file, { allowScripts: false })
    } catch (err) {
      if (err instanceof DefinitionError) throw new UsageError('BAD_SERVICE', err.message.replace(`${file}: `, ''), { cause: err })
      throw err
    }
    const existing = await filesFor(dir, args.name)
    if (existing.length && !args.force)
      throw new UsageError('SERVICE_EXISTS', `${existing.map((d) => join(dir, d.file)).join(', ')} already defines ${args.name}; edit it, or pass --force to replace it`)
    await mkdir(dir, { recursive: true, mode: 0o755 })
    for (const d of existing) if (d.file !== file) await rm(join(dir, d.file))
    const text = `# ${args.name}: written by \`tinc-consul service add\`; edit freely, the daemon picks changes up.\n${toToml(data)}`
    await writeFileAtomic(join(dir, file), text, 0o644)
    if (args.json) console.log(JSON.stringify({ file: join(dir, file), definition: def }))
    else console.log(`wrote ${join(dir, file)}: ${def.name} on ${def.protocol} ${def.port}, ${def.check.type} check`)
  },
})

const remove = defineCommand({
  meta: { name: 'rm', description: "Delete a service's definition file; a running daemon deregisters it" },
  args: { ...serviceArgs, name: { type: 'positional', description: 'The service (or its file name without extension)', required: true } },
  async run({ args }) {
    const dir = dirOf(args, requireNet(args.net))
    const defs = await filesFor(dir, args.name)
    if (defs.length === 0) throw new UsageError('NO_SERVICE', `no definition for ${JSON.stringify(args.name)} in ${dir}`)
    if (defs.length > 1) throw new UsageError('AMBIGUOUS', `${defs.length} files define ${args.name}: ${defs.map((d) => d.file).join(', ')}; remove one by its file name without extension`)
    const def = defs[0] as ServiceDefinition
    await rm(join(dir, def.file))
    if (args.json) console.log(JSON.stringify({ removed: join(dir, def.file) }))
    else console.log(`removed ${join(dir, def.file)}`)
  },
})

interface LocalRow {
  name: string
  file: string
  port?: number
  protocol?: string
  check?: string
  health: string
  output?: string
  error?: string
}

async function localRows(args: Common, net: string): Promise<{ rows: LocalRow[]; agentError?: string }> {
  const dir = dirOf(args, net)
  const files = await readAll(dir)
  const client = clientOf(args)
  let onAgent: Awaited<ReturnType<typeof agentServices>> | undefined
  let checks: Record<string, AgentCheck> = {}
  let agentError: string | undefined
  let naming: ServiceNaming | undefined
  try {
    onAgent = await agentServices(client, metaFilter('Meta', META.net, net))
    checks = await agentChecks(client)
    // Only to show a deleted file's service under its mesh name: without the record, its Consul name.
    naming = await namingOf(args, net).catch(() => undefined)
  } catch (err) {
    agentError = (err as Error).message
  }
  const status = (id: string) => {
    if (!onAgent) return { health: 'unknown' }
    if (!onAgent[id]) return { health: 'not registered' }
    const c = checks[checkId(id)]
    return c ? { health: c.Status, output: c.Output.trim().split('\n')[0] } : { health: 'no check' }
  }
  const rows: LocalRow[] = files.map((f) =>
    f.def
      ? { name: f.def.name, file: f.file, port: f.def.port, protocol: f.def.protocol, check: f.def.check.type, ...status(serviceId(net, f.def.stem)) }
      : { name: f.file.replace(/\.[^.]+$/, ''), file: f.file, health: 'invalid', error: f.error },
  )
  // Registered by us but without a file any more: the daemon isn't running, or hasn't caught up.
  const known = new Set(files.map((f) => f.file))
  for (const s of Object.values(onAgent ?? {})) {
    const file = s.Meta?.[META.file] ?? ''
    if (!known.has(file)) rows.push({ name: naming?.toMesh(s.Service) ?? s.Service, file: `(${file || 'no file'}, deleted)`, port: s.Port, protocol: s.Meta?.[META.protocol], ...status(s.ID) })
  }
  return { rows, agentError }
}

async function meshRows(args: Common, net: string): Promise<HealthyEntry[]> {
  const client = clientOf(args)
  const filters = serviceFilters(net)
  const naming = await namingOf(args, net)
  const { names } = await catalogServices(client, { filter: filters.catalog })
  const out: HealthyEntry[] = []
  // One read at a time: a command, not a daemon, and never more than one connection to the agent.
  for (const service of names.filter((n) => naming.toMesh(n) !== undefined))
    out.push(...parseHealthEntries(service, (await passingInstances(client, { service, filter: filters.health })).entries, net, naming).entries)
  return out.sort((a, b) => a.name.localeCompare(b.name) || a.node.localeCompare(b.node) || a.port - b.port)
}

const listArgs = { ...serviceArgs, all: { type: 'boolean', description: 'Every healthy instance on every node, as DNS serves them', default: false } } as const
const list = defineCommand({
  meta: { name: 'ls', description: "This node's services with their health; with --all, every healthy instance in the mesh" },
  args: listArgs,
  async run({ args }) {
    const net = requireNet(args.net)
    if (args.all) {
      const rows = await meshRows(args, net)
      if (args.json) return console.log(JSON.stringify(rows))
      if (rows.length === 0) return console.log('no healthy services in the mesh')
      return console.log(table([['SERVICE', 'NODE', 'ADDRESS', 'PORT', 'PROTO', 'TAGS'], ...rows.map((r) => [r.name, r.node, r.address, String(r.port), r.protocol, r.tags.join(',')])]))
    }
    const { rows, agentError } = await localRows(args, net)
    if (args.json) return console.log(JSON.stringify({ services: rows, ...(agentError ? { agentError } : {}) }))
    if (agentError) console.error(`warning: ${agentError}; health unknown`)
    if (rows.length === 0) return console.log(`no services defined in ${dirOf(args, net)} (add one with \`tinc-consul service add NAME --port P\`)`)
    console.log(table([['SERVICE', 'PORT', 'PROTO', 'CHECK', 'HEALTH', 'FILE'], ...rows.map((r) => [r.name, r.port ? String(r.port) : '-', r.protocol ?? '-', r.check ?? '-', r.health, r.file])]))
    for (const r of rows) if (r.error) console.log(`\n${r.error}`)
  },
})

const TTL_STATUS: Record<string, CheckStatus> = { pass: 'passing', warn: 'warning', fail: 'critical' }
const ttl = defineCommand({
  meta: { name: 'ttl', description: 'Report a ttl-checked service\'s health, e.g. from cron: `tinc-consul service ttl backup pass --note "nightly ok"`' },
  args: {
    ...serviceArgs,
    name: { type: 'positional', description: 'The service', required: true },
    status: { type: 'positional', description: 'pass, warn or fail', required: false, default: 'pass' },
    note: { type: 'string', description: described("Text shown with the check's status", 'ttl-note'), default: process.env.TINC_CONSUL_TTL_NOTE },
  },
  async run({ args }) {
    const net = requireNet(args.net)
    const status = TTL_STATUS[args.status ?? 'pass']
    if (!status) throw new UsageError('BAD_FLAG', `status must be pass, warn or fail, got ${JSON.stringify(args.status)}`)
    const defs = await filesFor(dirOf(args, net), args.name)
    if (defs.length === 0) throw new UsageError('NO_SERVICE', `no definition for ${JSON.stringify(args.name)} in ${dirOf(args, net)}`)
    if (defs.length > 1) throw new UsageError('AMBIGUOUS', `${defs.length} files define ${args.name}: ${defs.map((d) => d.file).join(', ')}; name one by its file name without extension`)
    const def = defs[0] as ServiceDefinition
    if (def.check.type !== 'ttl')
      throw new UsageError(
        'NOT_TTL',
        `${def.file} has a ${def.check.type} check, which ${def.check.type === 'script' || def.check.type === 'http' ? 'is run for you' : 'Consul runs'}; only ttl checks take reports`,
      )
    const id = checkId(serviceId(net, def.stem))
    try {
      await updateTtlCheck(clientOf(args), id, status, args.note ?? `${args.status} from tinc-consul service ttl at ${new Date().toISOString()}`)
    } catch (err) {
      if ((err as { status?: number }).status === 404 || /unknown check/i.test((err as Error).message))
        throw new TincConsulError('NOT_REGISTERED', `${def.name} is not registered on the agent yet; is \`tinc-consul run --net ${net}\` running?`, { cause: err })
      throw err
    }
    if (args.json) console.log(JSON.stringify({ service: def.name, check: id, status }))
    else console.log(`${def.name}: ${status}`)
  },
})

export const serviceCommand = defineCommand({
  meta: { name: 'service', description: "Declare this node's services (files the daemon registers in Consul with health checks) and list the mesh's healthy ones" },
  // `service --net NET` lists, like `service ls`.
  args: listArgs,
  subCommands: { add, rm: remove, ls: list, ttl },
  default: 'ls',
})
