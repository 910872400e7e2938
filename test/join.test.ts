import { newGroupValue } from '../src/mesh/groups.ts'
import { after, before, describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import { connect, createServer } from 'node:net'
import { createConsulClient, type ConsulClient } from '../src/consul/client.ts'
import { ConsulError } from '../src/errors.ts'
import { kvLayout } from '../src/mesh/kv-layout.ts'
import { startDevConsul, type DevConsul } from '../src/lab/dev-consul.ts'
import { createInvite, decodeInvite, deriveInvite, encodeInvite, open, seal } from '../src/mesh/invite.ts'
import { JoinRefusedError, redeemInvite, sanitizeHostFile } from '../src/mesh/join-client.ts'
import { startJoinServer, type JoinServer } from '../src/mesh/join-server.ts'
import { ephemeral } from '../src/mesh/join-crypto.ts'
import { GENERIC_REFUSAL, STATUS_ERROR, STATUS_OK, decodeRequest, encodeRequest, frame, readFrame, replyAad, requestAad } from '../src/mesh/join-wire.ts'
import { createNetwork } from '../src/mesh/network.ts'
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
    await createNetwork(admin, layout, NETWORK)
    // A public node already in the network: joiners get its host file.
    await admin.kvPut(layout.node('hub'), JSON.stringify(nodeRecord('hub', 1)))
    await admin.kvPut(layout.ipam('10.99.0.1'), JSON.stringify({ name: 'hub', at: '2026-11-21T00:00:00.000Z' }))
    server = await startJoinServer({ net: 'test', layout, client: admin, acl: false, host: '127.0.0.1', port: 0, log: quiet, burst: 1000 })
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

  test("an invite for a group gets an address in the group's range, and one whose group is gone is refused before anything is written", async () => {
    await admin.kvPut(layout.group('lab'), JSON.stringify(newGroupValue({ cidr: '10.99.0.128/25' })))
    const inv = decodeInvite((await createInvite({ client: admin, layout, net: 'test', endpoints: [endpoint], ttlMs: 3_600_000, createdBy: 'test', group: 'lab' })).invite)
    const reply = await redeemInvite(inv, { name: 'benchpc', publicKey: rsaPublicPem(), addresses: [], port: 655 })
    assert.equal(reply.address, '10.99.0.129', "the first free address of the group's range")
    assert.equal(JSON.parse((await admin.kvGet(layout.ipam('10.99.0.129')))?.value ?? '{}').name, 'benchpc')
    const made = await createInvite({ client: admin, layout, net: 'test', endpoints: [endpoint], ttlMs: 3_600_000, createdBy: 'test', group: 'lab' })
    await admin.txn([{ KV: { Verb: 'delete', Key: layout.group('lab') } }])
    await assert.rejects(
      redeemInvite(decodeInvite(made.invite), { name: 'orphan', publicKey: rsaPublicPem(), addresses: [], port: 655 }),
      /the invite is for group lab, which can't be used now: no group lab/,
    )
    assert.equal(await admin.kvGet(layout.node('orphan')), undefined, 'nothing written for a refused join')
    assert.deepEqual(await keys(layout.invitesPrefix), [made.id], 'the invite is not spent: the operator can make the group again or revoke it')
    await admin.txn([{ KV: { Verb: 'delete', Key: layout.invite(made.id) } }])
  })

  test('wrong, expired, tampered, oversized and misdirected requests are refused alike and change nothing', async () => {
    const before = { nodes: await keys(layout.nodesPrefix), ipam: await keys(layout.ipamPrefix) }
    const good = await invite()
    const wrongToken = { ...good, token: Buffer.from(good.token).map((b, i) => (i === 0 ? b ^ 1 : b)) }
    await assert.rejects(redeemInvite(wrongToken, { name: 'mallory', publicKey: key, addresses: [], port: 655 }), { message: new RegExp(GENERIC_REFUSAL.replace(/[()]/g, '\\$&')) })

    const expired = await invite({ now: new Date(Date.now() - 7_200_000) })
    await assert.rejects(redeemInvite({ ...expired, expiresAt: new Date(Date.now() + 1000) }, { name: 'late', publicKey: key, addresses: [], port: 655 }), { message: /invite not valid/ })
    assert.deepEqual(await keys(layout.invitesPrefix), [deriveInvite(good.token).id], 'an expired invite should be cleaned up when presented')

    // Tampered ciphertext, sent by hand. The untampered request is accepted (below), so these
    // refusals come from the tampering and not from a malformed hand-made request.
    const { id, key: sealKey } = deriveInvite(good.token)
    const header = Buffer.from(JSON.stringify({ v: 2, net: 'test', name: 'tamper', id }))
    const plain = Buffer.from(
      JSON.stringify({ v: 2, token: Buffer.from(good.token).toString('base64url'), epk: ephemeral().publicKey.toString('base64url'), publicKey: key, addresses: [], port: 655 }),
    )
    const sealed = Buffer.from(seal(sealKey, requestAad(header), plain))
    sealed.writeUInt8((sealed[sealed.length - 5] ?? 0) ^ 0x40, sealed.length - 5)
    assert.match(await rawExchange(server.port, encodeRequest(header, sealed)), /invite not valid/)

    // The same sealed request under another name: the name is associated data.
    const otherHeader = Buffer.from(JSON.stringify({ v: 2, net: 'test', name: 'swapped', id }))
    assert.match(await rawExchange(server.port, encodeRequest(otherHeader, seal(sealKey, requestAad(header), plain))), /invite not valid/)

    // A version-1 request (no ephemeral key) gets the generic refusal, not a reply sealed with the invite key alone.
    const v1 = Buffer.from(JSON.stringify({ v: 1, net: 'test', name: 'old', id }))
    const v1body = Buffer.from(JSON.stringify({ v: 1, token: Buffer.from(good.token).toString('base64url'), publicKey: key, addresses: [], port: 655 }))
    assert.equal(await rawExchange(server.port, encodeRequest(v1, seal(sealKey, requestAad(v1), v1body))), GENERIC_REFUSAL)

    // 10 MiB: refused from the 8-byte head, never buffered, and with nothing but the generic refusal.
    assert.equal(await rawExchange(server.port, frame(Buffer.alloc(10 * 1024 * 1024, 0x41))), GENERIC_REFUSAL)

    // Not our protocol at all.
    assert.equal(await rawExchange(server.port, Buffer.from('GET / HTTP/1.1\r\nHost: x\r\n\r\n')), GENERIC_REFUSAL)

    // A request peers would refuse (an address that is no host name) is refused before anything is written.
    await assert.rejects(redeemInvite(good, { name: 'badaddr', publicKey: key, addresses: ['not a host!'], port: 655 }), { message: /would be refused by peers/ })

    assert.deepEqual({ nodes: await keys(layout.nodesPrefix), ipam: await keys(layout.ipamPrefix) }, before, 'a refused join left state behind')
    // The invite survived all of that and still works for its holder.
    const reply = await redeemInvite(good, { name: 'honest', publicKey: rsaPublicPem(), addresses: ['198.18.0.9'], port: 655 })
    assert.equal(reply.address, '10.99.0.3')
  })

  test('a recorded exchange stays sealed when the invite string leaks afterwards', async () => {
    const inv = await invite()
    const tap = await recordingProxy(server.port)
    try {
      const reply = await redeemInvite({ ...inv, endpoints: [tap.endpoint] }, { name: 'recorded', publicKey: rsaPublicPem(), addresses: [], port: 655 })
      assert.equal(reply.name, 'recorded')
    } finally {
      await tap.close()
    }
    // The eavesdropper now finds the invite string: it opens the request...
    const { key: leaked } = deriveInvite(inv.token)
    const { header, sealed } = decodeRequest(tap.sent().subarray(8))
    const request = JSON.parse(Buffer.from(open(leaked, requestAad(header), sealed)).toString()) as { token: string; epk: string }
    assert.equal(request.token, Buffer.from(inv.token).toString('base64url'))
    // ...but not the reply, which holds the node's Consul token and the gossip key.
    const replied = tap.received().subarray(8)
    assert.equal(replied[0], STATUS_OK)
    assert.throws(() => open(leaked, replyAad(header), replied.subarray(1)), 'the reply opens with the invite key alone')
    assert.throws(() => open(leaked, replyAad(header), replied.subarray(1 + 32)))
  })

  test("a joiner's ephemeral key that is a low-order point is refused before the invite is spent", async () => {
    const inv = await invite()
    const { id, key: sealKey } = deriveInvite(inv.token)
    const header = Buffer.from(JSON.stringify({ v: 2, net: 'test', name: 'loworder', id }))
    const body = Buffer.from(JSON.stringify({ v: 2, token: Buffer.from(inv.token).toString('base64url'), epk: Buffer.alloc(32).toString('base64url'), publicKey: key, addresses: [], port: 655 }))
    // Past authentication (a specific reason, not the generic refusal), yet nothing written.
    assert.match(await rawExchange(server.port, encodeRequest(header, seal(sealKey, requestAad(header), body))), /low-order|not an X25519 key/)
    assert.equal(await admin.kvGet(layout.node('loworder')), undefined)
    assert.equal((await redeemInvite(inv, { name: 'loworder', publicKey: rsaPublicPem(), addresses: [], port: 655 })).name, 'loworder', 'the invite was spent')
  })

  test('when no endpoint answers yet, the joiner asks again and gets in once a join server is up', async () => {
    const probe = createServer()
    await new Promise<void>((r) => probe.listen(0, '127.0.0.1', r))
    const port = (probe.address() as { port: number }).port
    await new Promise((r) => probe.close(r))
    const inv = await invite()
    let late: JoinServer | undefined
    let retries = 0
    try {
      const reply = await redeemInvite(
        { ...inv, endpoints: [`127.0.0.1:${port}`] },
        { name: 'early', publicKey: rsaPublicPem(), addresses: [], port: 655 },
        {
          retryForMs: 60_000,
          // The server comes up only after the first round has found nobody there.
          onRetry: () => void (retries++ === 0 && startJoinServer({ net: 'test', layout, client: admin, acl: false, host: '127.0.0.1', port, log: quiet }).then((s) => (late = s))),
        },
      )
      assert.equal(reply.name, 'early')
      assert.ok(retries >= 1)
    } finally {
      await late?.close()
    }
    // With no time to retry, the same situation fails at once.
    await assert.rejects(redeemInvite({ ...(await invite()), endpoints: [`127.0.0.1:${port}`] }, { name: 'never', publicKey: rsaPublicPem(), addresses: [], port: 655 }, { retryForMs: 0 }), {
      code: 'JOIN_UNREACHABLE',
    })
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

  test('before the token checks out, a request for another network, a bad header or a bad body hears exactly the generic refusal', async () => {
    const good = await invite()
    const { id, key: sealKey } = deriveInvite(good.token)
    const epk = ephemeral().publicKey.toString('base64url')
    const body = (token: Uint8Array) => Buffer.from(JSON.stringify({ v: 2, token: Buffer.from(token).toString('base64url'), epk, publicKey: key, addresses: [], port: 655 }))
    const request = (h: object, k: Uint8Array, b: Buffer) => {
      const header = Buffer.from(JSON.stringify(h))
      return encodeRequest(header, seal(k, requestAad(header), b))
    }
    const refusals = [
      // Another network, an unknown invite: the old endpoint named its own network here.
      await rawExchange(server.port, request({ v: 2, net: 'othernet', name: 'probe', id: randomBytes(16).toString('hex') }, randomBytes(32), body(randomBytes(32)))),
      // Another network, this network's invite id, but no token.
      await rawExchange(server.port, request({ v: 2, net: 'othernet', name: 'probe', id }, randomBytes(32), body(randomBytes(32)))),
      // A header that isn't one.
      await rawExchange(server.port, encodeRequest(Buffer.from('{"v":1,"net":"x\u001b[31m"}'), Buffer.alloc(64))),
      // The right key (as whoever reads invites/ holds it), but a body that isn't a request.
      await rawExchange(server.port, request({ v: 2, net: 'test', name: 'probe', id }, sealKey, Buffer.from('{"v":2}'))),
      // The right key, but not the token.
      await rawExchange(server.port, request({ v: 2, net: 'test', name: 'probe', id }, sealKey, body(randomBytes(32)))),
    ]
    assert.deepEqual(
      refusals,
      refusals.map(() => GENERIC_REFUSAL),
    )
    assert.equal((await redeemInvite(good, { name: 'probed', publicKey: rsaPublicPem(), addresses: [], port: 655 })).name, 'probed', 'the probes spent the invite')
  })

  // The timeout: a rate-limited connection used to stay open after its client closed, so close() never returned.
  test('a rate-limited address and a failed Consul read hear the generic refusal too', { timeout: 15_000 }, async () => {
    const limited = await startJoinServer({ net: 'test', layout, client: admin, acl: false, host: '127.0.0.1', port: 0, log: quiet, burst: 1, refillMs: 3_600_000 })
    const broken = await startJoinServer({
      net: 'test',
      layout,
      client: { ...admin, kvGet: () => Promise.reject(new ConsulError('CONSUL_UNREACHABLE', 'consul is down')) },
      acl: false,
      host: '127.0.0.1',
      port: 0,
      log: quiet,
    })
    try {
      const probe = encodeRequest(Buffer.from(JSON.stringify({ v: 1, net: 'test', name: 'probe', id: randomBytes(16).toString('hex') })), Buffer.alloc(64))
      assert.equal(await rawExchange(limited.port, probe), GENERIC_REFUSAL)
      assert.equal(await rawExchange(limited.port, probe), GENERIC_REFUSAL)
      assert.equal(limited.stats.rateLimited, 1)
      assert.equal(await rawExchange(broken.port, probe), GENERIC_REFUSAL)
    } finally {
      await limited.close()
      await broken.close()
    }
  })

  test('a refusal from an endpoint that is not a join server moves the joiner on to the next, real one', async () => {
    const hostile = await refusingEndpoint('invite not valid (wrong, expired or already used)')
    try {
      const inv = await invite()
      const tried: string[] = []
      const reply = await redeemInvite(
        { ...inv, endpoints: [hostile.endpoint, endpoint] },
        { name: 'relayed', publicKey: rsaPublicPem(), addresses: [], port: 655 },
        { onTry: (ep, err) => void tried.push(`${ep}${err ? ` ${err.code}` : ''}`) },
      )
      assert.equal(reply.endpoint, endpoint)
      assert.equal(reply.name, 'relayed')
      assert.equal(hostile.requests(), 1)
      assert.deepEqual(tried, [hostile.endpoint, `${hostile.endpoint} JOIN_REFUSED`, endpoint])
    } finally {
      await hostile.close()
    }
  })

  test("when every endpoint refuses, the error lists each reason once, with the network's control characters gone", async () => {
    const nasty = `\x1b[31mred\x1b[0m \x1b]0;owned\x07\x1b]52;c;cm0gLXJmIH4=\x1b\\bell\x07 cr\r\n  127.0.0.1:1: forged line \u009b2J del\x7f nul\x00 \u202eevil ${'A'.repeat(5000)}`
    const a = await refusingEndpoint(nasty)
    const b = await refusingEndpoint(nasty)
    try {
      const inv = await invite()
      await redeemInvite(inv, { name: 'spent', publicKey: rsaPublicPem(), addresses: [], port: 655 })
      const err = await redeemInvite({ ...inv, endpoints: [a.endpoint, endpoint, b.endpoint] }, { name: 'spent2', publicKey: rsaPublicPem(), addresses: [], port: 655 }).then(
        () => assert.fail('a spent invite was redeemed'),
        (e: unknown) => e as JoinRefusedError,
      )
      assert.ok(err instanceof JoinRefusedError)
      assert.equal(err.code, 'JOIN_REFUSED')
      const lines = err.message.split('\n')
      assert.equal(lines.length, 3, err.message)
      assert.ok(lines[1]?.startsWith(`  ${a.endpoint}, ${b.endpoint} refused: red `), lines[1])
      assert.equal(lines[2], `  ${endpoint} refused: ${GENERIC_REFUSAL}`)
      // eslint-disable-next-line no-control-regex -- looking for control characters is the point
      assert.doesNotMatch(err.message.replaceAll('\n  ', ' '), /[\x00-\x1f\x7f-\x9f\u202a-\u202e]/)
      for (const gone of ['[31m', '[0m', 'owned', 'cm0gLXJmIH4=', '2J']) assert.ok(!err.message.includes(gone), `"${gone}" got through`)
      assert.ok(err.message.length < 600, `the refusal text was not capped: ${err.message.length} characters`)
    } finally {
      await a.close()
      await b.close()
    }
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

/** A TCP relay to the join server that records both directions, as an eavesdropper on the path would. */
async function recordingProxy(port: number): Promise<{ endpoint: string; sent(): Buffer; received(): Buffer; close(): Promise<void> }> {
  const up: Buffer[] = []
  const down: Buffer[] = []
  const srv = createServer((client) => {
    const upstream = connect({ host: '127.0.0.1', port })
    client.on('data', (d) => void (up.push(d), upstream.write(d)))
    upstream.on('data', (d) => void (down.push(d), client.write(d)))
    upstream.on('end', () => client.end())
    client.on('error', () => upstream.destroy())
    upstream.on('error', () => client.destroy())
  })
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r))
  return {
    endpoint: `127.0.0.1:${(srv.address() as { port: number }).port}`,
    sent: () => Buffer.concat(up),
    received: () => Buffer.concat(down),
    close: () => new Promise((r) => srv.close(() => r())),
  }
}

/** A TCP server that speaks the join framing and refuses every request with `text`, as a squatting node would. */
async function refusingEndpoint(text: string): Promise<{ endpoint: string; requests(): number; close(): Promise<void> }> {
  let requests = 0
  const srv = createServer((socket) => {
    socket.on('error', () => undefined)
    readFrame(socket).then(
      () => {
        requests++
        socket.end(frame(Buffer.concat([Buffer.from([STATUS_ERROR]), Buffer.from(text)])))
      },
      () => socket.destroy(),
    )
  })
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r))
  return {
    endpoint: `127.0.0.1:${(srv.address() as { port: number }).port}`,
    requests: () => requests,
    close: () => new Promise<void>((r) => srv.close(() => r())),
  }
}

test("a joiner checks each reply file as a record (with its /32) and writes it for the network's mode: no Subnet line in switch mode", () => {
  const hub = nodeRecord('hub', 1)
  const router = sanitizeHostFile('hub', hub.hostFile, NETWORK) ?? assert.fail('router mode dropped the file')
  assert.match(router, /^Subnet = 10\.99\.0\.1\/32$/m, 'router mode writes the record form')
  const sw = sanitizeHostFile('hub', hub.hostFile, { ...NETWORK, mode: 'switch' })
  assert.equal(sw, router.replace(/^Subnet = 10\.99\.0\.1\/32\n/m, ''), 'switch mode writes the same file without its Subnet line')
  // The check still needs the /32: a file without one, or claiming another range, is dropped in either mode.
  for (const network of [NETWORK, { ...NETWORK, mode: 'switch' as const }]) {
    assert.equal(sanitizeHostFile('hub', hub.hostFile.replace(/^Subnet = .*\n/m, ''), network), undefined)
    assert.equal(sanitizeHostFile('hub', hub.hostFile.replace('10.99.0.1/32', '10.99.0.0/24'), network), undefined)
  }
})
