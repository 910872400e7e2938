import { after, before, describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { readFile, rm, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { b64, createConsulClient, type ConsulClient } from '../src/consul/client.ts'
import { startDevConsul, type DevConsul } from '../src/lab/dev-consul.ts'
import { txnWithChangeLog } from '../src/mesh/change-log.ts'
import { kvLayout } from '../src/mesh/kv-layout.ts'
import { createNetwork } from '../src/mesh/network.ts'
import { NETWORK, nodeRecord, rsaPublicPem } from './helpers-keys.ts'
import { decodeJson, nodeRecordSchema } from '../src/mesh/record.ts'
import { keyFingerprint, parseHostFile } from '../src/tinc/hostfile.ts'
import { startFaultProxy, startNode, tempRoot, type Answer, type FaultProxy, type TestNode } from './sync-fixture.ts'

const layout = kvLayout('test')
// One key for the canary across its rewrites: a new key under a pinned name would be refused.
const canaryPem = rsaPublicPem()
const betaPem = rsaPublicPem()
const betaKey = `/v1/kv/${layout.node('beta')}`
/** The daemon's full read of nodes/ (`?recurse`), as opposed to its probe, its log read and single records. */
const isFullRead = (url: URL) => url.pathname === `/v1/kv/${layout.nodesPrefix}` && url.searchParams.has('recurse')
/** Polls until `check` holds (generous deadline; not a timed assertion). */
async function poll(check: () => boolean, what: string): Promise<void> {
  const deadline = Date.now() + 60_000
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`never true: ${what}`)
    await new Promise((r) => setTimeout(r, 50))
  }
}

/**
 * The daemon against a real agent behind a proxy that fails, filters or blanks single reads.
 * Each case is one of issue 16's findings, and each fails on a daemon that takes "I could not
 * read it" for "it is gone".
 */
describe('sync under faults in single Consul reads', () => {
  let consul: DevConsul
  let admin: ConsulClient
  let proxy: FaultProxy
  let root: string
  const running: TestNode[] = []
  const file = (n: TestNode, peer: string) => readFile(join(n.tincDir, 'hosts', peer), 'utf8').catch(() => undefined)
  const start = async (name: string, octet: number, via: string, tincDir?: string) => {
    const n = await startNode({ root, name, octet, isPublic: true, consulUrl: via, tincDir })
    running.push(n)
    return n
  }
  const stop = async (n: TestNode) => {
    await n.daemon.stop()
    running.splice(running.indexOf(n), 1)
  }

  before(async () => {
    consul = await startDevConsul()
    admin = createConsulClient({ url: consul.url })
    proxy = await startFaultProxy(consul.url)
    root = await tempRoot()
    await createNetwork(admin, layout, NETWORK)
    await admin.kvPut(layout.node('beta'), JSON.stringify(nodeRecord('beta', 2, betaPem)))
    await admin.kvPut(layout.node('gamma'), JSON.stringify(nodeRecord('gamma', 3)))
  })
  after(async () => {
    for (const n of [...running]) await n.daemon.stop()
    await proxy?.stop()
    await consul?.stop()
    if (root) await rm(root, { recursive: true, force: true })
  })

  test('a full read that fails after a restart keeps every host file (500, then 429); so does a change whose read fails', async (t) => {
    const first = await start('alpha', 1, consul.url)
    await first.until(async () => (await file(first, 'beta')) !== undefined && (await file(first, 'gamma')) !== undefined, 'beta and gamma written')
    const before = await file(first, 'beta')
    const gamma = await file(first, 'gamma')
    await stop(first) // writes the cache, with beta in it
    for (const status of [500, 429]) {
      // Every full read of nodes/ fails; everything else answers.
      let failed = 0
      proxy.rule = (method, url) => {
        if (method !== 'GET' || !isFullRead(url)) return 'pass'
        failed++
        return { status, body: status === 429 ? 'Your IP is issuing too many concurrent connections' : 'rpc error: No cluster leader' }
      }
      const again = await start('alpha', 1, proxy.url, first.tincDir)
      await again.until(() => again.events.some((e) => e.source === 'cache'), 'rendered from the cache')
      await poll(() => failed >= 3, `the full read of nodes/ failed three times (${status})`)
      assert.ok(!again.events.some((e) => e.source === 'consul'), `an apply from consul without a read of nodes/ (${status})`)
      assert.equal(await file(again, 'beta'), before, `a failed read (${status}) changed or deleted beta's host file`)
      assert.equal(await file(again, 'gamma'), gamma, `a failed read (${status}) changed or deleted gamma's host file`)
      proxy.rule = () => 'pass'
      await again.until(() => again.events.some((e) => e.source === 'consul') && again.daemon.pending().length === 0, 'an apply from consul once nodes/ reads')
      assert.equal(await file(again, 'beta'), before)
      assert.equal(await file(again, 'gamma'), gamma)
      t.diagnostic(`HTTP ${status} on ${failed} full reads of nodes/: files kept, no apply from consul until one succeeded`)
      await stop(again)
    }

    // A change to beta, written with the change log so the daemon reads beta alone, and that read fails.
    const alpha = await start('alpha', 1, proxy.url, first.tincDir)
    await alpha.until(() => alpha.events.some((e) => e.source === 'consul') && alpha.daemon.pending().length === 0, 'an apply from consul')
    let betaFailed = 0
    let fullFailed = 0
    let failFull = true
    proxy.rule = (method, url) => {
      if (method !== 'GET') return 'pass'
      if (url.pathname === betaKey && !url.searchParams.has('recurse') && !url.searchParams.has('keys')) {
        betaFailed++
        return { status: 500, body: 'rpc error: No cluster leader' }
      }
      if (failFull && isFullRead(url)) {
        fullFailed++
        return { status: 429, body: 'Your IP is issuing too many concurrent connections' }
      }
      return 'pass'
    }
    try {
      const changed = await txnWithChangeLog(admin, layout, [{ KV: { Verb: 'set', Key: layout.node('beta'), Value: b64(JSON.stringify(nodeRecord('beta', 102, betaPem))) } }], ['beta'])
      assert.ok(changed.result.ok && changed.logged)
      // Its own read failed, and so did the full read it fell back to: beta's file is as it was.
      await poll(() => betaFailed >= 1 && fullFailed >= 1, "beta's read and the full read both failed")
      assert.equal(await file(alpha, 'beta'), before, "a failed read changed or deleted beta's host file")
      assert.ok(alpha.daemon.view()?.peers.has('beta'), 'beta left the view over a failed read')
      // The full read answers again (beta's own read still fails): the new content arrives.
      failFull = false
      await alpha.until(async () => (await file(alpha, 'beta'))?.includes('198.18.0.102') === true, "beta's change applied once a read succeeded")
      t.diagnostic(`beta's read failed ${betaFailed} times and the full read ${fullFailed} times; beta kept its file until the full read passed`)
    } finally {
      proxy.rule = () => 'pass'
    }
    assert.equal(await file(alpha, 'gamma'), gamma)
    await stop(alpha)
  })

  test('a full read filtered by ACL, cut short, or blank removes nobody; a complete one does', async () => {
    const alpha = await start('alpha', 1, proxy.url, join(root, 'alpha', 'tinc'))
    await alpha.until(async () => (await file(alpha, 'gamma')) !== undefined && alpha.daemon.pending().length === 0, 'gamma there')
    const withoutGamma = (a: Answer) => Buffer.from(JSON.stringify((JSON.parse(a.body.toString()) as Array<{ Key: string }>).filter((e) => !e.Key.endsWith('/gamma'))))
    // What a token without read on gamma sees: the full read lacks it and says so in a header.
    let rewritten = 0
    proxy.rewrite = (url, a) => {
      if (!isFullRead(url)) return a
      rewritten++
      return { ...a, headers: { ...a.headers, 'x-consul-results-filtered-by-acls': 'true' }, body: withoutGamma(a) }
    }
    // A write without the change log: the daemon can only learn of it by reading nodes/ in full.
    await admin.kvPut(layout.node('canary'), JSON.stringify(nodeRecord('canary', 40, canaryPem)))
    await alpha.until(async () => (await file(alpha, 'canary')) !== undefined, 'canary arrived through the filtered read')
    assert.ok(rewritten > 0, 'canary arrived without a full read')
    assert.ok((await file(alpha, 'gamma')) !== undefined, 'a filtered read deleted gamma')
    // A full read cut short without saying so (a server catching up): gamma is read directly first.
    proxy.rewrite = (url, a) => (isFullRead(url) ? { ...a, body: withoutGamma(a) } : a)
    await admin.kvPut(layout.node('canary'), JSON.stringify(nodeRecord('canary', 42, canaryPem)))
    await alpha.until(
      async () => (await file(alpha, 'canary'))?.includes('198.18.0.42') === true && alpha.daemon.pending().includes('gamma'),
      'canary changed, and gamma, missing from the read, confirmed present',
    )
    assert.ok((await file(alpha, 'gamma')) !== undefined, 'a read that left gamma out deleted it')
    // A blank full read (a stale read during a leader change): nobody is removed either.
    proxy.rewrite = (url, a) => (isFullRead(url) ? { ...a, body: Buffer.from('[]') } : a)
    const ignored = alpha.daemon.stats.emptyReadsIgnored
    await admin.kvPut(layout.node('canary'), JSON.stringify(nodeRecord('canary', 41, canaryPem)))
    await alpha.until(() => alpha.daemon.stats.emptyReadsIgnored > ignored, 'the blank read was seen')
    for (const peer of ['beta', 'gamma', 'canary']) {
      assert.ok((await file(alpha, peer)) !== undefined, `a blank read deleted ${peer}`)
      assert.ok(alpha.daemon.view()?.peers.has(peer), `a blank read took ${peer} out of the view (and the cache)`)
    }
    proxy.rewrite = (_url, a) => a
    await admin.request('DELETE', `/v1/kv/${layout.node('canary')}`)
    await alpha.until(async () => (await file(alpha, 'canary')) === undefined, 'canary removed by a complete read')
    for (const peer of ['beta', 'gamma']) assert.ok((await file(alpha, peer)) !== undefined, `${peer} went with canary`)
    await alpha.until(() => alpha.daemon.pending().length === 0, 'gamma read again in full')
    await stop(alpha)
  })

  test('a stray peer file is removed after the first complete read, one on the keep list is not', async () => {
    const dir = join(root, 'alpha', 'tinc')
    const stray = nodeRecord('stray', 77)
    await writeFile(join(dir, 'hosts', 'stray'), stray.hostFile)
    await writeFile(join(dir, 'hosts', 'handmade'), 'Address = 198.18.0.99\nSubnet = 10.99.0.99/32\n# the operator keeps this one\n')
    await writeFile(join(root, 'keep'), '# peers outside consul\nhandmade\n')
    const alpha = await startNode({ root, name: 'alpha', octet: 1, isPublic: true, consulUrl: consul.url, tincDir: dir, keepFile: join(root, 'keep') })
    running.push(alpha)
    await alpha.until(async () => (await file(alpha, 'stray')) === undefined, 'the stray file removed')
    assert.match((await file(alpha, 'handmade')) ?? '', /the operator keeps this one/)
    assert.ok((await file(alpha, 'beta')) !== undefined)
    await stop(alpha)
  })

  test('after an outage the daemon re-reads at once and says Consul is reachable again', async (t) => {
    const alpha = await start('alpha', 1, proxy.url, join(root, 'alpha', 'tinc'))
    await alpha.until(() => alpha.daemon.consul().reachable, 'reachable')
    proxy.rule = () => ({ status: 500, body: 'No known Consul servers' })
    // A blocking read in progress ends when the agent gives up on the servers; here, by a write.
    await admin.kvPut(layout.node('latecomer'), JSON.stringify(nodeRecord('latecomer', 50)))
    await alpha.until(() => !alpha.daemon.consul().reachable, 'the outage noticed')
    const back = Date.now()
    proxy.rule = () => 'pass'
    await alpha.until(async () => (await file(alpha, 'latecomer')) !== undefined && alpha.daemon.consul().reachable, 'the change made during the outage applied, and reachable again')
    t.diagnostic(`applied and reachable ${Date.now() - back} ms after the outage ended (target: under 2000 ms)`)
    await stop(alpha)
  })
})

describe('two daemons with one name', () => {
  let consul: DevConsul
  let root: string
  const nodes: TestNode[] = []
  before(async () => {
    consul = await startDevConsul()
    root = await tempRoot()
    await createNetwork(createConsulClient({ url: consul.url }), layout, NETWORK)
  })
  after(async () => {
    for (const n of nodes) await n.daemon.stop()
    await consul?.stop()
    if (root) await rm(root, { recursive: true, force: true })
  })

  test('a cloned node is reported and stops rewriting, instead of looping', async () => {
    const admin = createConsulClient({ url: consul.url })
    // Same name, another key and another address: a restored backup on another machine.
    nodes.push(await startNode({ root: join(root, 'a'), name: 'twin', octet: 5, isPublic: true, consulUrl: consul.url }))
    nodes.push(await startNode({ root: join(root, 'b'), name: 'twin', octet: 5, isPublic: true, consulUrl: consul.url }))
    const [a, b] = nodes as [TestNode, TestNode]
    const fingerprint = async (n: TestNode) => keyFingerprint(parseHostFile(await readFile(join(n.tincDir, 'hosts', 'twin'), 'utf8')).publicKey ?? '')
    const [fpA, fpB] = [await fingerprint(a), await fingerprint(b)]
    const inKv = async () => decodeJson((await admin.kvGet(layout.node('twin')))?.value ?? '', nodeRecordSchema)
    // Settled: one side gave up, and the record is the other side's (its last write has landed).
    const settledNow = async () => {
      const d = await inKv()
      return d.ok && ((a.daemon.conflict()?.gaveUp === true && d.value.fingerprint === fpB) || (b.daemon.conflict()?.gaveUp === true && d.value.fingerprint === fpA))
    }
    await Promise.race([a.until(settledNow, "one side gave up and the other's record stands"), b.until(settledNow, "one side gave up and the other's record stands")])
    const settled = (await admin.kvGet(layout.node('twin')))?.modifyIndex
    // Something else happens in the mesh; both daemons see it, and neither writes twin again.
    await admin.kvPut(layout.node('canary'), JSON.stringify(nodeRecord('canary', 60)))
    for (const n of [a, b]) await n.until(async () => (await readFile(join(n.tincDir, 'hosts', 'canary'), 'utf8').catch(() => undefined)) !== undefined, 'canary seen')
    const conflict = a.daemon.conflict() ?? b.daemon.conflict()
    assert.ok(conflict && conflict.ours !== conflict.theirs, 'the conflict names two different fingerprints')
    assert.ok([a, b].every((n) => (n.daemon.conflict()?.attempts ?? 0) <= 3))
    assert.equal((await admin.kvGet(layout.node('twin')))?.modifyIndex, settled, 'the record kept being rewritten')
  })
})
