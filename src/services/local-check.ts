import { execFile } from 'node:child_process'
import http from 'node:http'
import { httpsModule } from '../util/lazy-https.ts'
import type { CheckStatus } from '../consul/agent.ts'
import type { ServiceDefinition } from './definition.ts'
import { checkUrl } from './registration.ts'
import { scriptCheckProblem, scriptRefusal } from './strict-modes.ts'

/**
 * The checks the daemon runs itself and reports to a TTL check on the agent:
 * script checks (so the agent never needs enable_script_checks, which would let
 * anyone who can reach its API run commands) and HTTP checks that expect one
 * exact status, which Consul's own HTTP check can't express.
 */
export interface CheckResult {
  status: CheckStatus
  output: string
  /** Set when a script check was not run because its file or program can't be trusted (see strict-modes.ts). */
  refused?: string
}

const MAX_OUTPUT = 4096

export function runLocalCheck(def: ServiceDefinition, address: string): Promise<CheckResult> {
  const c = def.check
  if (c.type === 'script') return runTrustedScript(def.path, c.command, c.timeoutMs)
  if (c.type === 'http' && c.status !== undefined) return runHttp(checkUrl(def, address) ?? '', c.status, c.timeoutMs, c.tlsSkipVerify)
  return Promise.resolve({ status: 'critical', output: `a ${c.type} check is run by Consul, not by tinc-consul` })
}

/**
 * The checks made when the file was read, made again before every run: a definition file,
 * a directory or the program loosened or swapped since then turns the check critical (so the
 * service leaves DNS) instead of running. A few lstat calls per run, at most once a second.
 */
async function runTrustedScript(definitionPath: string | undefined, command: string[], timeoutMs: number): Promise<CheckResult> {
  const problem = definitionPath === undefined ? 'it was not read from a file' : await scriptCheckProblem(definitionPath, command)
  if (problem !== undefined) {
    const refused = scriptRefusal(definitionPath ?? '(no file)', problem)
    return { status: 'critical', output: refused, refused }
  }
  return runScript(command, timeoutMs)
}

/** Nagios' convention, as Consul uses it: 0 passes, 1 warns, anything else is critical. */
function runScript(command: string[], timeoutMs: number): Promise<CheckResult> {
  const [file, ...args] = command
  return new Promise((resolve) => {
    execFile(
      file ?? '',
      args,
      { timeout: timeoutMs, killSignal: 'SIGKILL', maxBuffer: 64 * 1024, env: { PATH: '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' } },
      (err, stdout, stderr) => {
        const output = `${stdout}${stderr}`.slice(0, MAX_OUTPUT)
        if (!err) return resolve({ status: 'passing', output })
        const e = err as Error & { killed?: boolean; code?: number | string; signal?: string | null }
        if (e.killed) return resolve({ status: 'critical', output: `timed out after ${timeoutMs} ms\n${output}`.slice(0, MAX_OUTPUT) })
        if (typeof e.code === 'string') return resolve({ status: 'critical', output: `could not run ${file}: ${e.message}` })
        resolve({ status: e.code === 1 ? 'warning' : 'critical', output: `exit ${e.code ?? e.signal ?? '?'}\n${output}`.slice(0, MAX_OUTPUT) })
      },
    )
  })
}

function runHttp(url: string, expect: number, timeoutMs: number, skipVerify: boolean): Promise<CheckResult> {
  return new Promise((resolve) => {
    const u = new URL(url)
    const mod = u.protocol === 'https:' ? httpsModule() : http
    // No redirects followed: a 302 to a login page is exactly what `status = 302` may be waiting for.
    const req = mod.get(u, { timeout: timeoutMs, rejectUnauthorized: !skipVerify, headers: { 'user-agent': 'tinc-consul health check' } }, (res) => {
      res.resume()
      const got = res.statusCode ?? 0
      resolve(got === expect ? { status: 'passing', output: `GET ${url}: ${got}` } : { status: 'critical', output: `GET ${url}: got ${got}, expected ${expect}` })
    })
    req.on('timeout', () => req.destroy(new Error(`timed out after ${timeoutMs} ms`)))
    req.on('error', (err) => resolve({ status: 'critical', output: `GET ${url}: ${err.message}` }))
  })
}
