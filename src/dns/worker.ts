/**
 * A DNS helper process: the daemon forks it and hands it the UDP sockets it
 * has bound, so the kernel spreads datagrams over both processes. It holds no
 * state of its own beyond the zone the daemon last sent, and exits when the
 * daemon goes away, so a helper is never left behind.
 */
import type { Socket } from 'node:dgram'
import { createLogger } from '../log.ts'
import { newStats, serveUdp } from './server.ts'
import type { AnswerLimits } from './limits.ts'
import { buildZone, type Zone, type ZoneInput } from './zone.ts'

const log = createLogger().child({ component: 'dns-helper', pid: process.pid })
const stats = newStats()
let zone: Zone | undefined

if (!process.send) {
  process.stderr.write('this is a helper of `tinc-consul run`, not a command\n')
  process.exit(2)
}
// The daemon sends its answer limits with every zone, so both build the same answers.
process.on('message', (m: { t?: string; input?: ZoneInput; limits?: AnswerLimits }, handle: unknown) => {
  try {
    if (m?.t === 'zone' && m.input) zone = buildZone(m.input, m.limits)
    else if (m?.t === 'udp' && handle) serveUdp(handle as Socket, () => zone, stats, log)
  } catch (err) {
    log.error({ err }, 'could not apply a message from the daemon')
  }
})
process.on('disconnect', () => process.exit(0))
process.on('SIGTERM', () => process.exit(0))
process.send?.({ t: 'ready' })
setInterval(() => process.send?.({ t: 'stats', stats }), 1000).unref()
