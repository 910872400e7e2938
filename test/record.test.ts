import { test } from 'node:test'
import assert from 'node:assert/strict'
import { checkPeer, decodeJson, networkMode, networkRecordSchema, nodeRecordSchema, type NodeRecord } from '../src/mesh/record.ts'
import { keyFingerprint, parseHostFile, renderHostFile } from '../src/tinc/hostfile.ts'
import { NETWORK, nodeRecord, rsaPublicPem } from './helpers-keys.ts'

const pem = rsaPublicPem()
const decode = (v: unknown) => decodeJson(typeof v === 'string' ? v : JSON.stringify(v), nodeRecordSchema)
const check = (r: NodeRecord, keyName = r.name) => checkPeer(r, { network: NETWORK, keyName })

test('a well-formed record decodes and passes the peer checks', () => {
  const d = decode(nodeRecord('laptop', 7, pem))
  assert.ok(d.ok)
  const c = check(d.value)
  assert.ok(c.ok, c.ok ? '' : c.reason)
  assert.equal(c.value.publicKey, pem)
})

test('garbage is refused record by record with a reason, never thrown', () => {
  assert.deepEqual(decode('x'.repeat(1 << 20)), { ok: false, reason: 'value is 1048576 bytes, over the 8192-byte limit' })
  assert.deepEqual(decodeJson(new Uint8Array([0x7b, 0xff, 0xfe, 0x7d]), nodeRecordSchema), { ok: false, reason: 'value is not UTF-8' })
  assert.deepEqual(decode('{not json'), { ok: false, reason: 'value is not JSON' })
})

test('a field this release does not know is dropped, never kept or rendered (a newer node must not vanish)', () => {
  const extra = decode({ ...nodeRecord('a', 2, pem), proxy: 'exec rm -rf /', subnetsV6: ['fd00::2/128'] })
  assert.ok(extra.ok, extra.ok ? '' : extra.reason)
  assert.deepEqual(Object.keys(extra.value).sort(), Object.keys(nodeRecord('a', 2, pem)).sort())
  const c = check(extra.value)
  assert.ok(c.ok)
  const text = renderHostFile({ addresses: c.value.record.addresses, port: c.value.record.port, subnets: c.value.record.subnets, options: c.value.options, publicKey: c.value.publicKey })
  assert.doesNotMatch(text, /proxy|fd00/i)
})

test('names that tinc would not accept, or that escape hosts/, are refused', () => {
  for (const name of ['../x', 'x-up', 'a/b', '', 'x'.repeat(65), 'dot.name']) {
    const d = decode({ ...nodeRecord('ok', 3, pem), name })
    assert.equal(d.ok, false, `accepted name ${JSON.stringify(name)}`)
  }
})

test('a record must describe the node it is stored under', () => {
  const c = check(nodeRecord('alice', 3, pem), 'bob')
  assert.deepEqual(c, { ok: false, reason: 'record stored under "bob" names "alice"' })
})

test('a node cannot claim another address, a wider range, a default route, or an address outside the network', () => {
  const r = nodeRecord('mallory', 5, pem)
  assert.match(String(!check({ ...r, subnets: ['10.99.0.6/32'] }).ok && 'refused'), /refused/)
  for (const subnets of [['10.99.0.0/24'], ['0.0.0.0/0'], ['10.99.0.5/32', '10.99.0.9/32']]) {
    const c = check({ ...r, subnets })
    assert.equal(c.ok, false, `accepted ${subnets.join(',')}`)
  }
  const stolen = check({ ...r, hostFile: r.hostFile.replace('Subnet = 10.99.0.5/32', 'Subnet = 10.99.0.1/32') })
  assert.deepEqual(stolen, { ok: false, reason: "host file claims subnet 10.99.0.1/32, not the node's own 10.99.0.5/32" })
  assert.equal(check({ ...r, vpnAddress: '10.98.0.5', subnets: ['10.98.0.5/32'] }).ok, false)
  assert.equal(check({ ...r, vpnAddress: '10.99.0.255', subnets: ['10.99.0.255/32'] }).ok, false)
})

test('the fingerprint must match the key in the host file', () => {
  const r = nodeRecord('eve', 4, pem)
  const c = check({ ...r, fingerprint: keyFingerprint(rsaPublicPem()) })
  assert.deepEqual(c, { ok: false, reason: 'fingerprint does not match the public key in the host file' })
})

test('host-file lines off the allow-list are dropped, and the rendered file holds only safe lines', () => {
  const r = nodeRecord('peer', 8, pem, ['Proxy = exec /bin/sh -c "touch /tmp/pwned"', 'ScriptsInterpreter = /bin/sh', 'Compression = 9', 'Cipher = none', 'TCPOnly = maybe'])
  const c = check(r)
  assert.ok(c.ok)
  assert.deepEqual(c.value.dropped, ['Proxy', 'ScriptsInterpreter', 'Cipher', 'TCPOnly'])
  const text = renderHostFile({ addresses: r.addresses, port: r.port, subnets: r.subnets, options: c.value.options, publicKey: c.value.publicKey })
  assert.doesNotMatch(text, /Proxy|Scripts|Cipher|TCPOnly/)
  assert.match(text, /^Compression = 9$/m)
  assert.match(text, /^Subnet = 10\.99\.0\.8\/32$/m)
  const reparsed = parseHostFile(text)
  assert.equal(reparsed.publicKey, pem)
  assert.deepEqual(reparsed.errors, [])
})

test('a host file with two keys or a broken key block is refused', () => {
  const r = nodeRecord('twokeys', 9, pem)
  assert.equal(check({ ...r, hostFile: `${r.hostFile}\n${rsaPublicPem()}\n` }).ok, false)
  assert.equal(check({ ...r, hostFile: r.hostFile.replace('-----END RSA PUBLIC KEY-----', '') }).ok, false)
  assert.equal(check({ ...r, hostFile: r.hostFile.replace(/-----BEGIN[\s\S]*-----END RSA PUBLIC KEY-----/, '') }).ok, false)
})

test("the network record's mode: switch is kept, absent means router, an unknown mode is refused by name", () => {
  const net = (extra: object) => decodeJson(JSON.stringify({ ...NETWORK, ...extra }), networkRecordSchema)
  const sw = net({ mode: 'switch' })
  assert.ok(sw.ok, sw.ok ? '' : sw.reason)
  assert.equal(sw.value.mode, 'switch')
  assert.equal(networkMode(sw.value), 'switch')
  const old = net({})
  assert.ok(old.ok, old.ok ? '' : old.reason)
  assert.equal(old.value.mode, undefined)
  assert.equal(networkMode(old.value), 'router', 'a record from before the field is a router network')
  assert.deepEqual(net({ mode: 'hub' }), { ok: false, reason: 'invalid record: mode: unknown tinc mode "hub" (this release knows router and switch)' })
  assert.equal(net({ mode: 7 }).ok, false)
  // Node records are judged the same in both modes: they still carry the /32 (DNS, the address table).
  const r = nodeRecord('laptop', 7, pem)
  assert.ok(sw.ok && checkPeer(r, { network: sw.value, keyName: 'laptop' }).ok)
  assert.equal(checkPeer({ ...r, subnets: ['10.99.0.0/24'] }, { network: sw.value, keyName: 'laptop' }).ok, false)
})
