import { after, before, test } from 'node:test'
import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { createJoinServerToken, createNodeToken, deleteNodeTokens } from '../src/consul/acl.ts'
import { createConsulClient, type ConsulClient } from '../src/consul/client.ts'
import { kvLayout } from '../src/mesh/kv-layout.ts'
import { startDevConsul, type DevConsul } from '../src/lab/dev-consul.ts'

const layout = kvLayout('home')
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
  const alice = await createNodeToken(admin, layout, 'alice')
  const aliceAgain = await createNodeToken(admin, layout, 'alice') // a re-join after a lost disk
  const aliceJoins = await createJoinServerToken(admin, layout, 'alice')
  const bob = await createNodeToken(admin, layout, 'bob')
  const bobJoins = await createJoinServerToken(admin, layout, 'bob')
  for (const t of [alice, aliceAgain, aliceJoins, bob, bobJoins]) assert.equal(await works(t.secretId), true)

  const gone = await deleteNodeTokens(admin, layout, 'alice')
  assert.deepEqual(gone.sort(), [alice.accessorId, aliceAgain.accessorId, aliceJoins.accessorId].sort())
  for (const t of [alice, aliceAgain, aliceJoins]) assert.equal(await works(t.secretId), false, "alice's tokens no longer work")
  for (const t of [bob, bobJoins]) assert.equal(await works(t.secretId), true, 'bob keeps his')
  assert.deepEqual(await deleteNodeTokens(admin, layout, 'alice'), [], 'a second revoke finds nothing left')
  assert.deepEqual(await deleteNodeTokens(admin, layout, 'carol'), [], 'a node that never had a token')
})
