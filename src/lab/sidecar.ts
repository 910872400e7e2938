import { fileURLToPath } from 'node:url'
import type { Status } from '../status/model.ts'
import type { Lab } from './lab.ts'

/**
 * How to start our own CLI inside a namespace: from source through tsx when
 * this module itself runs from source (tests, `npm run lab`), else the build.
 * TINC_CONSUL_LAB_BUILD=1 runs the build from source too: benchmarks measure
 * what users run, without tsx's loader thread and compiler.
 */
export function cliArgv(): string[] {
  const here = import.meta.url
  if (here.endsWith('.ts') && process.env.TINC_CONSUL_LAB_BUILD === '1') return [process.execPath, fileURLToPath(new URL('../../dist/cli/main.js', here))]
  if (here.endsWith('.ts')) {
    const cli = fileURLToPath(new URL('../cli/main.ts', here))
    return [process.execPath, '--import', import.meta.resolve('tsx'), cli]
  }
  return [process.execPath, fileURLToPath(new URL('../cli/main.js', here))]
}

/** A node's sidecar's /status, fetched inside its namespace (no curl needed: this Node does it). */
export async function sidecarStatus(lab: Lab, node: string): Promise<Status> {
  const script = `fetch('http://127.0.0.1:9000/status').then(async (r) => process.stdout.write(await r.text()))`
  return JSON.parse((await lab.exec(node, [process.execPath, '-e', script])).stdout) as Status
}
