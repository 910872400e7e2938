import { after, before, test } from 'node:test'
import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { createJoinServerToken, createNodeToken, deleteNodeTokens } from '../src/consul/acl.ts'
import { createConsulClient, type ConsulClient } from '../src/consul/client.ts'
import { ConsulError } from '../src/errors.ts'
import { kvLayout } from '../src/mesh/kv-layout.ts'
import { startDevConsul, type DevConsul } from '../src/lab/dev-consul.ts'
import { policyScopeFor } from '../src/services/naming.ts'

const layout = kvLayout('home')
const scope = policyScopeFor(layout, 'home', { serviceNames: 'scoped' })
let consul: DevConsul
let admin: ConsulClient

before(async () => {
  const managementToken = randomUUID()
  consul = await startDevConsul({ managementToken })
  admin = createConsulClient({ url: consul.url, token: managementToken })
})
after(async () => {
  await consul?.stop()
})

/** Whether Consul still accepts a token: a deleted one gets 403 "ACL not found". */
const works = (secretId: string) =>
  createConsulClient({ url: consul.url, token: secretId })
    .request('GET', '/v1/acl/token/self')
    .then(
      () => true,
      () => false,
    )

test("revoking a node deletes its own and its join endpoint's tokens, and no other node's", async () => {
  const alice = await createNodeToken(admin, scope, 'alice')
  const aliceAgain = await createNodeToken(admin, scope, 'alice') // a re-join after a lost disk
  const aliceJoins = await createJoinServerToken(admin, layout, 'alice')
  const bob = await createNodeToken(admin, scope, 'bob')
  const bobJoins = await createJoinServerToken(admin, layout, 'bob')
  for (const t of [alice, aliceAgain, aliceJoins, bob, bobJoins]) assert.equal(await works(t.secretId), true)

  const gone = await deleteNodeTokens(admin, layout, 'alice')
  assert.deepEqual(gone.sort(), [alice.accessorId, aliceAgain.accessorId, aliceJoins.accessorId].sort())
  for (const t of [alice, aliceAgain, aliceJoins]) assert.equal(await works(t.secretId), false, "alice's tokens no longer work")
  for (const t of [bob, bobJoins]) assert.equal(await works(t.secretId), true, 'bob keeps his')
  assert.deepEqual(await deleteNodeTokens(admin, layout, 'alice'), [], 'a second revoke finds nothing left')
  assert.deepEqual(await deleteNodeTokens(admin, layout, 'carol'), [], 'a node that never had a token')
})

/** The status Consul answers a request with, as one number: 200 or the refusal's. */
const statusOf = (client: ConsulClient, method: string, path: string, body?: unknown) =>
  client.request(method, path, body).then(
    () => 200,
    (err: unknown) => (err instanceof ConsulError && err.status !== undefined ? err.status : Promise.reject(err)),
  )

test("a node's token writes only its own service names and reads its network's; a bare network's writes any", async () => {
  const alice = createConsulClient({ url: consul.url, token: (await createNodeToken(admin, scope, 'alice')).secretId })
  const reg = (name: string) => ({ ID: `acl-${name}`, Name: name, Port: 80 })
  // bob's own instance, filed under bob.
  const bobWeb = { ID: 'bob-web', Service: 'tinc-home--bob--web', Port: 80 }
  await admin.request('PUT', '/v1/catalog/register', { Node: 'bob', Address: '198.18.0.2', Service: bobWeb })
  try {
    assert.equal(await statusOf(alice, 'PUT', '/v1/agent/service/register', reg('tinc-home--alice--web')), 200, 'its own name')
    for (const name of ['tinc-home--bob--web', 'tinc-home--web', 'tinc-home--alice2--web', 'tinc-home--Alice--web', 'vault'])
      assert.equal(await statusOf(alice, 'PUT', '/v1/agent/service/register', reg(name)), 403, name)
    // The catalog takes a service write for a change to another node's instances (the node itself unchanged): refused, being bob's name.
    const repost = { Node: 'bob', Address: '198.18.0.2', SkipNodeUpdate: true, Service: { ...bobWeb, Port: 9999 } }
    assert.equal(await statusOf(alice, 'PUT', '/v1/catalog/register', repost), 403, "moving bob's instance")
    assert.equal(await statusOf(alice, 'PUT', '/v1/catalog/deregister', { Node: 'bob', ServiceID: bobWeb.ID }), 403, "removing bob's instance")
    // Reads cover the whole network: alice's DNS serves bob's services.
    const seen = await alice.request<Array<{ Service: { ID: string; Port: number } }>>('GET', `/v1/health/service/${bobWeb.Service}`)
    assert.deepEqual(
      seen.map((e) => [e.Service.ID, e.Service.Port]),
      [[bobWeb.ID, 80]],
    )
    const flat = createConsulClient({ url: consul.url, token: (await createNodeToken(admin, policyScopeFor(kvLayout('flat'), 'flat', {}), 'carol')).secretId })
    assert.equal(await statusOf(flat, 'PUT', '/v1/agent/service/register', reg('anything')), 200, 'bare names: any name, as before')
  } finally {
    // Whichever got registered (all of them, on a policy that let too much through).
    const names = ['tinc-home--alice--web', 'tinc-home--bob--web', 'tinc-home--web', 'tinc-home--alice2--web', 'tinc-home--Alice--web', 'vault', 'anything']
    for (const name of names) await statusOf(admin, 'PUT', `/v1/agent/service/deregister/acl-${name}`)
    await admin.request('PUT', '/v1/catalog/deregister', { Node: 'bob' })
  }
})
