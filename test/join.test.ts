import { after, before, describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { connect, createServer } from 'node:net'
import { createConsulClient, type ConsulClient } from '../src/consul/client.ts'
import { kvLayout } from '../src/mesh/kv-layout.ts'
import { startDevConsul, type DevConsul } from '../src/lab/dev-consul.ts'
import { createInvite, decodeInvite, deriveInvite, encodeInvite, seal } from '../src/mesh/invite.ts'
import { JoinRefusedError, redeemInvite, sanitizeHostFile } from '../src/mesh/join-client.ts'
import { startJoinServer, type JoinServer } from '../src/mesh/join-server.ts'
import { GENERIC_REFUSAL, encodeRequest, frame, readFrame, requestAad } from '../src/mesh/join-wire.ts'
import { writeNetworkRecord } from '../src/mesh/network.ts'
import { revokeNode } from '../src/mesh/revoke.ts'
import { NETWORK, nodeRecord, rsaPublicPem } from './helpers-keys.ts'
import { quiet } from './sync-fixture.ts'

const layout = kvLayout('test')

describe('the join endpoint against a real Consul agent', () => {
  let consul: DevConsul
  let admin: ConsulClient
  let server: JoinServer
  let endpoint: string
  const key = rsaPublicPem()
  const invite = async (opts: { name?: string; ttlMs?: number; now?: Date } = {}) =>
    decodeInvite((await createInvite({ client: admin, layout, net: 'test', endpoints: [endpoint], name: opts.name, ttlMs: opts.ttlMs ?? 3_600_000, createdBy: 'test', now: opts.now })).invite)
  const keys = async (prefix: string) => (await admin.kvList(prefix)).items.map((i) => i.key.slice(prefix.length)).sort()

  before(async () => {
    consul = await startDevConsul()
    admin = createConsulClient({ url: consul.url })
    await writeNetworkRecord(admin, layout, NETWORK)
    // A public node already in the network: joiners get its host file.
    await admin.kvPut(layout.node('hub'), JSON.stringify(nodeRecord('hub', 1)))
    await admin.kvPut(layout.ipam('10.99.0.1'), JSON.stringify({ name: 'hub', at: '2026-11-21T00:00:00.000Z' }))
    server = await startJoinServer({ net: 'test', layout, client: admin, url: consul.url, acl: false, host: '127.0.0.1', port: 0, log: quiet, burst: 1000 })
    endpoint = `127.0.0.1:${server.port}`
  })
  after(async () => {
    await server?.close()
    await consul?.stop()
  })

  test('a good invite gets an address, a record, the public host files, and is used up', async () => {
    const inv = await invite()
    const reply = await redeemInvite(inv, { name: 'laptop', publicKey: key, addresses: [], port: 655 })
    assert.equal(reply.address, '10.99.0.2')
    assert.deepEqual(Object.keys(reply.hostFiles), ['hub'])
    assert.ok(sanitizeHostFile('hub', reply.hostFiles.hub ?? '', reply.network))
    const record = JSON.parse((await admin.kvGet(layout.node('laptop')))?.value ?? '{}') as { vpnAddress?: string; addresses?: string[] }
    assert.equal(record.vpnAddress, '10.99.0.2')
    assert.deepEqual(record.addresses, [])
    assert.deepEqual(await keys(layout.invitesPrefix), [], 'the invite is still there after use')
    // Single use.
    await assert.rejects(
      redeemInvite(inv, { name: 'laptop2', publicKey: rsaPublicPem(), addresses: [], port: 655 }),
      (err: Error) => err instanceof JoinRefusedError && err.message.includes(GENERIC_REFUSAL),
    )
  })

  test('wrong, expired, tampered, oversized and misdirected requests are refused alike and change nothing', async () => {
    const before = { nodes: await keys(layout.nodesPrefix), ipam: await keys(layout.ipamPrefix) }
    const good = await invite()
    const wrongToken = { ...good, token: Buffer.from(good.token).map((b, i) => (i === 0 ? b ^ 1 : b)) }
    await assert.rejects(redeemInvite(wrongToken, { name: 'mallory', publicKey: key, addresses: [], port: 655 }), { message: new RegExp(GENERIC_REFUSAL.replace(/[()]/g, '\\$&')) })

    const expired = await invite({ now: new Date(Date.now() - 7_200_000) })
    await assert.rejects(redeemInvite({ ...expired, expiresAt: new Date(Date.now() + 1000) }, { name: 'late', publicKey: key, addresses: [], port: 655 }), { message: /invite not valid/ })
    assert.deepEqual(await keys(layout.invitesPrefix), [deriveInvite(good.token).id], 'an expired invite should be cleaned up when presented')

    // Tampered ciphertext, sent by hand.
    const { id, key: sealKey } = deriveInvite(good.token)
    const header = Buffer.from(JSON.stringify({ v: 1, net: 'test', name: 'tamper', id }))
    const sealed = Buffer.from(seal(sealKey, requestAad(header), Buffer.from(JSON.stringify({ v: 1, token: Buffer.from(good.token).toString('base64url'), publicKey: key, addresses: [], port: 655 }))))
    sealed.writeUInt8((sealed[sealed.length - 5] ?? 0) ^ 0x40, sealed.length - 5)
    assert.match(await rawExchange(server.port, encodeRequest(header, sealed)), /invite not valid/)

    // The same sealed request under another name: the name is associated data.
    const resealed = Buffer.from(
      seal(sealKey, requestAad(header), Buffer.from(JSON.stringify({ v: 1, token: Buffer.from(good.token).toString('base64url'), publicKey: key, addresses: [], port: 655 }))),
    )
    const otherHeader = Buffer.from(JSON.stringify({ v: 1, net: 'test', name: 'swapped', id }))
    assert.match(await rawExchange(server.port, encodeRequest(otherHeader, resealed)), /invite not valid/)

    // 10 MiB: refused from the 8-byte head, never buffered.
    assert.match(await rawExchange(server.port, frame(Buffer.alloc(10 * 1024 * 1024, 0x41))), /over the 65536-byte limit/)

    // Not our protocol at all.
    assert.match(await rawExchange(server.port, Buffer.from('GET / HTTP/1.1\r\nHost: x\r\n\r\n')), /not a tinc-consul join message/)

    // A request peers would refuse (an address that is no host name) is refused before anything is written.
    await assert.rejects(redeemInvite(good, { name: 'badaddr', publicKey: key, addresses: ['not a host!'], port: 655 }), { message: /would be refused by peers/ })

    assert.deepEqual({ nodes: await keys(layout.nodesPrefix), ipam: await keys(layout.ipamPrefix) }, before, 'a refused join left state behind')
    // The invite survived all of that and still works for its holder.
    const reply = await redeemInvite(good, { name: 'honest', publicKey: rsaPublicPem(), addresses: ['198.18.0.9'], port: 655 })
    assert.equal(reply.address, '10.99.0.3')
  })

  test("a named invite is only for that name, and an invite can't take a name in use", async () => {
    const named = await invite({ name: 'printer' })
    await assert.rejects(redeemInvite(named, { name: 'other', publicKey: key, addresses: [], port: 655 }), { message: /this invite is for "printer"/ })
    const any = await invite()
    await assert.rejects(redeemInvite(any, { name: 'hub', publicKey: rsaPublicPem(), addresses: [], port: 655 }), { message: /name "hub" is taken/ })
    // Both invites are still good.
    assert.equal((await redeemInvite(named, { name: 'printer', publicKey: rsaPublicPem(), addresses: [], port: 655 })).name, 'printer')
    assert.equal((await redeemInvite(any, { name: 'tablet', publicKey: rsaPublicPem(), addresses: [], port: 655 })).name, 'tablet')
  })

  test('a dead endpoint is skipped and the next one redeems', async () => {
    const dead = createServer()
    await new Promise<void>((r) => dead.listen(0, '127.0.0.1', r))
    const deadPort = (dead.address() as { port: number }).port
    await new Promise((r) => dead.close(r))
    const inv = await invite()
    const tried: string[] = []
    const reply = await redeemInvite(
      { ...inv, endpoints: [`127.0.0.1:${deadPort}`, endpoint] },
      { name: 'phone', publicKey: rsaPublicPem(), addresses: [], port: 655 },
      { onTry: (ep, err) => void tried.push(`${ep}${err ? ' failed' : ''}`) },
    )
    assert.equal(reply.endpoint, endpoint)
    assert.deepEqual(tried, [`127.0.0.1:${deadPort}`, `127.0.0.1:${deadPort} failed`, endpoint])
  })

  test("a joiner gets no host file for a record squatting on another node's address, nor for a revoked key written back", async () => {
    // squatter holds 10.99.0.70, but its record (which its own token may write) claims hub's address.
    await admin.kvPut(layout.ipam('10.99.0.70'), JSON.stringify({ name: 'squatter', at: '2026-11-21T00:00:00.000Z' }))
    await admin.kvPut(layout.node('squatter'), JSON.stringify(nodeRecord('squatter', 1)))
    // gone was revoked, then its record was put back (a stolen token, a daemon that missed it).
    const gone = nodeRecord('gone', 71)
    await admin.kvPut(layout.ipam('10.99.0.71'), JSON.stringify({ name: 'gone', at: '2026-11-21T00:00:00.000Z' }))
    await admin.kvPut(layout.node('gone'), JSON.stringify(gone))
    await revokeNode(admin, layout, 'gone')
    await admin.kvPut(layout.node('gone'), JSON.stringify(gone))
    const reply = await redeemInvite(await invite(), { name: 'late', publicKey: rsaPublicPem(), addresses: [], port: 655 })
    const members = (await keys(layout.nodesPrefix)).filter((n) => !['squatter', 'gone', 'late'].includes(n))
    assert.ok(members.includes('hub') && members.includes('laptop'))
    assert.deepEqual(Object.keys(reply.hostFiles).sort(), members)
  })

  test("a name that differs from an established node's only in case is refused before anything is written", async () => {
    const inv = await invite()
    await assert.rejects(redeemInvite(inv, { name: 'HUB', publicKey: rsaPublicPem(), addresses: [], port: 655 }), { message: /differs from the existing node "hub" only in case/ })
    assert.equal((await keys(layout.nodesPrefix)).includes('HUB'), false)
    assert.equal((await redeemInvite(inv, { name: 'hub2', publicKey: rsaPublicPem(), addresses: [], port: 655 })).name, 'hub2', 'the refusal used up the invite')
  })
})

test('invites survive copy and paste, and garbage is a clear error', () => {
  const inv = { net: 'home', endpoints: ['198.18.0.1:8655', '[2001:db8::1]:8655'], token: new Uint8Array(32).fill(7), name: 'grandad', expiresAt: new Date('2026-12-01T00:00:00.000Z') }
  const text = encodeInvite(inv)
  assert.match(text, /^tcinv1_[A-Za-z0-9_-]+$/)
  assert.deepEqual(decodeInvite(`  '${text}'\n`), { ...inv, prefix: undefined, token: Buffer.from(inv.token) })
  assert.throws(() => decodeInvite(text.slice(0, -10)), { code: 'BAD_INVITE' })
  assert.throws(() => decodeInvite('https://example.invalid/join'), { code: 'BAD_INVITE' })
})

/** Sends raw bytes to the endpoint and returns its error message. */
async function rawExchange(port: number, bytes: Buffer): Promise<string> {
  const socket = connect({ host: '127.0.0.1', port })
  await new Promise<void>((r) => socket.once('connect', () => r()))
  socket.write(bytes, () => undefined)
  socket.on('error', () => undefined)
  const reply = await readFrame(socket, 4096)
  socket.destroy()
  assert.equal(reply[0], 1, 'expected an error reply')
  return reply.subarray(1).toString('utf8')
}
