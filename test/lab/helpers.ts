import { existsSync } from 'node:fs'
import { spawnSync } from 'node:child_process'
import { after, before, test, type TestContext } from 'node:test'
import { labUp, type Lab, type LabUpOptions } from '../../src/lab/lab.ts'
import { listNamespaces } from '../../src/lab/netns.ts'

/** Why the lab can't run here, or undefined when it can. */
function unavailable(): string | undefined {
  if (process.getuid?.() !== 0) return 'not running as root'
  if (!existsSync('/dev/net/tun')) return '/dev/net/tun is missing'
  if (spawnSync('ip', ['netns', 'list']).status !== 0) return '`ip netns` does not work here'
  return undefined
}

const reason = unavailable()
let warned = false

/**
 * Declares a test that needs the namespace lab. Where the lab can't run it
 * skips loudly, unless REQUIRE_NETNS=1 (CI), where it fails: lab tests must
 * never skip silently.
 */
export function labTest(name: string, fn: (t: TestContext) => Promise<void> | void, timeoutMs = 180_000): void {
  if (!reason) {
    test(name, { timeout: timeoutMs }, fn)
    return
  }
  if (process.env.REQUIRE_NETNS === '1') {
    test(name, () => {
      throw new Error(`REQUIRE_NETNS=1 but the lab cannot run: ${reason}`)
    })
    return
  }
  if (!warned) {
    warned = true
    process.stderr.write(
      `\n${'!'.repeat(72)}\n!! SKIPPING network-namespace lab tests: ${reason}.\n!! Run as root (sudo npm test) to run them; CI sets REQUIRE_NETNS=1 so they can't skip there.\n${'!'.repeat(72)}\n\n`,
    )
  }
  test(name, { skip: `lab unavailable: ${reason}` }, () => {})
}

export const labAvailable = reason === undefined

export function namespacesWithPrefix(prefix: string): string[] {
  return listNamespaces().filter((ns) => ns.startsWith(`${prefix}-`))
}

export { processAlive as pidAlive } from '../../src/util/proc.ts'

/** Brings a lab up before the tests of the enclosing suite and tears it down after them. */
export function useLab(opts: LabUpOptions): () => Lab {
  let lab: Lab | undefined
  before(async () => {
    if (labAvailable) lab = await labUp(opts)
  })
  after(() => lab?.down())
  return () => {
    if (!lab) throw new Error('the lab did not come up')
    return lab
  }
}

/**
 * On a failed wait, shows what tincd and the sidecars said (a flaky mesh test is useless
 * without it), and any `extraLogs` (a process the test spawned), and keeps full copies in
 * $TMPDIR/tinc-consul-lab-logs/<lab id>/.
 */
export async function withLogs<T>(lab: Lab, nodes: string[], fn: () => Promise<T>, extraLogs: string[] = []): Promise<T> {
  try {
    return await fn()
  } catch (err) {
    const { copyFileSync, existsSync: exists, mkdirSync, readFileSync } = await import('node:fs')
    const { tmpdir } = await import('node:os')
    const { basename, dirname, join } = await import('node:path')
    const keep = join(tmpdir(), 'tinc-consul-lab-logs', lab.state.plan.id)
    mkdirSync(keep, { recursive: true })
    // The Consul agent's log too, where a test runs one on the node (a cluster that lost its leader says why there).
    const files = [...nodes.flatMap((n) => [lab.tincFiles(n).logFile, join(lab.state.runDir, n, 'sidecar.log'), join(lab.state.runDir, n, 'consul.log')]), ...extraLogs]
    for (const f of files) {
      if (!exists(f)) continue
      copyFileSync(f, join(keep, `${basename(dirname(f))}-${basename(f)}`))
      process.stderr.write(`\n----- ${f} (last 40 lines; full copy in ${keep})\n${readFileSync(f, 'utf8').split('\n').slice(-40).join('\n')}\n`)
    }
    throw err
  }
}

/**
 * dig in a node's namespace. Its note about a try that timed out before a retry answered is
 * dropped: a packet lost in the tunnel (tinc 1.0 loses a few around each session-key renewal,
 * every 60 s here) is the resolver's to retry, and the answer is what the assertions judge.
 */
export async function dig(lab: Lab, from: string, ...args: string[]): Promise<string> {
  const out = (await lab.exec(from, ['dig', '+time=2', '+tries=2', ...args], { allowFailure: true })).stdout
  return out.replace(/^;; communications error to \S+: timed out\n/gm, '')
}

export { sidecarStatus } from '../../src/lab/sidecar.ts'
