import { after, test } from 'node:test'
import assert from 'node:assert/strict'
import { mkdir, readdir, readFile, rm, symlink, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { reconcile } from '../src/mesh/reconcile.ts'
import type { MeshView } from '../src/mesh/view.ts'
import { hostFileText, renderTinc, type RenderOptions } from '../src/tinc/render.ts'
import { readManagedBlock } from '../src/tinc/conf-block.ts'
import { nodeEntry, nodeRecord, reconcileInput, rsaPublicPem, tincDirFixture } from './helpers-keys.ts'

// The renderer owns hosts/ (issue 16): it writes the view, deletes what left it, and after a
// complete read deletes every other node-named file; it never touches ours, the operator's
// kept files, or anything not named like a node.

const dirs: string[] = []
after(() => Promise.all(dirs.map((d) => rm(d, { recursive: true, force: true }))))

const alpha = nodeRecord('alpha', 2, rsaPublicPem())
const beta = nodeRecord('beta', 3, rsaPublicPem())
const hidden = nodeRecord('hidden', 5, rsaPublicPem())

/** A view of these records, as the reconciler builds it (here nobody is "self", so any name can be in it). */
function viewOf(...records: Array<typeof alpha>): MeshView {
  const r = reconcile(
    undefined,
    reconcileInput(
      records.map((x, i) => [x.name, nodeEntry(x, i + 1)]),
      { self: { name: 'nobody' } },
    ),
  )
  assert.deepEqual([...r.view.peers.keys()].sort(), records.map((x) => x.name).sort())
  return r.view
}

/** A tinc dir with our own file, a kept file, hook scripts, a dot file, a directory and a stale peer. */
async function fixture(): Promise<{ dir: string; hosts: string; before: Map<string, string> }> {
  const dir = await tincDirFixture('self')
  dirs.push(dir)
  const hosts = join(dir, 'hosts')
  const before = new Map([
    ['self', 'Subnet = 10.99.0.1/32\n# ours\n'],
    ['handmade', 'Address = 192.0.2.7\n# kept by hand\n'],
    ['x-up', '#!/bin/sh\n'],
    ['.alpha.1234.tmp', 'half-written'],
    ['stale', 'Subnet = 10.99.0.9/32\n'],
  ])
  for (const [name, text] of before) await writeFile(join(hosts, name), text)
  await mkdir(join(hosts, 'subdir'))
  await symlink('/nonexistent', join(hosts, 'link'))
  return { dir, hosts, before }
}

const opts = (dir: string, over: Partial<RenderOptions> = {}): RenderOptions => ({ tincDir: dir, self: 'self', keep: new Set(['handmade']), removed: [], prune: false, written: new Map(), ...over })

test('every host file is hostFileText of its peer; public peers get a ConnectTo', async () => {
  const { dir, hosts } = await fixture()
  const view = viewOf(alpha, { ...beta, addresses: [] })
  const r = await renderTinc(view, opts(dir))
  assert.deepEqual(r.written.sort(), ['alpha', 'beta'])
  for (const [name, peer] of view.peers) assert.equal(await readFile(join(hosts, name), 'utf8'), hostFileText(peer))
  assert.deepEqual(readManagedBlock(await readFile(join(dir, 'tinc.conf'), 'utf8')), ['ConnectTo = alpha'])
  assert.ok(r.hupNeeded, 'StrictSubnets: new peers need a HUP')
})

test('without prune, files the view lacks stay; with prune, only node-named files not ours, kept or pending go', async () => {
  const { dir, hosts, before } = await fixture()
  const view = viewOf(alpha)
  const written: RenderOptions['written'] = new Map()
  await writeFile(join(hosts, 'pendingpeer'), 'unjudged\n')
  const first = await renderTinc(view, opts(dir, { written }))
  assert.deepEqual(first.deleted, [])
  assert.ok((await readdir(hosts)).includes('stale'))
  const second = await renderTinc(view, opts(dir, { written, prune: true, pending: ['pendingpeer'] }))
  assert.deepEqual(second.deleted.sort(), ['link', 'stale'])
  assert.ok(second.hupNeeded)
  const left = (await readdir(hosts)).sort()
  assert.deepEqual(left, ['.alpha.1234.tmp', 'alpha', 'handmade', 'pendingpeer', 'self', 'subdir', 'x-up'])
  for (const [name, text] of before) if (left.includes(name)) assert.equal(await readFile(join(hosts, name), 'utf8'), text, `${name} untouched`)
})

test('our own file and kept files are never written or deleted, even when named in the view or in removed', async () => {
  const { dir, hosts, before } = await fixture()
  const view = viewOf(nodeRecord('self', 1, rsaPublicPem()), nodeRecord('handmade', 7, rsaPublicPem()), alpha)
  const r = await renderTinc(view, opts(dir, { removed: ['self', 'handmade', 'x-up', '../tinc.conf'], prune: true }))
  assert.deepEqual(r.written, ['alpha'])
  assert.equal(await readFile(join(hosts, 'self'), 'utf8'), before.get('self'))
  assert.equal(await readFile(join(hosts, 'handmade'), 'utf8'), before.get('handmade'))
  assert.equal(await readFile(join(hosts, 'x-up'), 'utf8'), before.get('x-up'))
  assert.deepEqual(readManagedBlock(await readFile(join(dir, 'tinc.conf'), 'utf8')), ['ConnectTo = alpha'])
})

test('removed names go at once, pending ones stay, and a name back in the view is never deleted', async () => {
  const { dir, hosts } = await fixture()
  const written: RenderOptions['written'] = new Map()
  await renderTinc(viewOf(alpha, beta, hidden), opts(dir, { written }))
  const r = await renderTinc(viewOf(alpha), opts(dir, { written, removed: ['alpha', 'beta', 'hidden'], pending: ['hidden'] }))
  assert.deepEqual(r.deleted, ['beta'])
  assert.deepEqual(
    r.reasons.filter((x) => x.includes('removed')),
    ['beta was removed'],
  )
  const left = await readdir(hosts)
  assert.ok(left.includes('alpha') && left.includes('hidden') && !left.includes('beta'))
  // beta coming back is written again even though `written` once had it.
  const back = await renderTinc(viewOf(alpha, beta), opts(dir, { written }))
  assert.deepEqual(back.written, ['beta'])
})

test('an unchanged peer object is not rendered again; a file changed behind our back is rewritten on a fresh start', async () => {
  const { dir, hosts } = await fixture()
  const view = viewOf(alpha)
  const written: RenderOptions['written'] = new Map()
  await renderTinc(view, opts(dir, { written }))
  await writeFile(join(hosts, 'alpha'), 'tampered\n')
  const same = await renderTinc(view, opts(dir, { written }))
  assert.deepEqual(same.written, [])
  const fresh = await renderTinc(view, opts(dir))
  assert.deepEqual(fresh.written, ['alpha'])
  assert.equal(await readFile(join(hosts, 'alpha'), 'utf8'), hostFileText(view.peers.get('alpha') ?? assert.fail()))
})

test('a removed name whose file someone else deleted is written again when it comes back', async () => {
  const { dir, hosts } = await fixture()
  const written: RenderOptions['written'] = new Map()
  const view = viewOf(alpha)
  await renderTinc(view, opts(dir, { written }))
  await rm(join(hosts, 'alpha'))
  await renderTinc(viewOf(), opts(dir, { written, removed: ['alpha'], prune: true }))
  // The same peer object as before: only a forgotten `written` entry makes it render again.
  const back = await renderTinc(view, opts(dir, { written }))
  assert.deepEqual(back.written, ['alpha'])
  assert.equal(await readFile(join(hosts, 'alpha'), 'utf8'), hostFileText(view.peers.get('alpha') ?? assert.fail()))
})

test("switch mode: peers' host files carry no Subnet line, the rest is the same; a tinc.conf in another mode is reported, not rewritten", async () => {
  const { dir, hosts } = await fixture()
  const router = viewOf(alpha, beta)
  const sw: MeshView = { ...router, network: { ...router.network, mode: 'switch' } }
  const conf = 'Name = self\nMode = switch\nDeviceType = tap\n'
  await writeFile(join(dir, 'tinc.conf'), conf)
  const written: RenderOptions['written'] = new Map()
  const r = await renderTinc(sw, opts(dir, { written }))
  assert.deepEqual(r.written.sort(), ['alpha', 'beta'])
  for (const [name, peer] of sw.peers) {
    const text = await readFile(join(hosts, name), 'utf8')
    assert.equal(text, hostFileText(peer, 'switch'))
    assert.doesNotMatch(text, /^Subnet/m, `hosts/${name} has a Subnet line in switch mode`)
    // Only the Subnet line differs from the router-mode file.
    assert.equal(text, hostFileText(peer).replace(/^Subnet = .*\n/m, ''))
    assert.match(hostFileText(peer), /^Subnet = 10\.99\.0\.\d+\/32$/m)
  }
  assert.equal(r.modeMismatch, undefined)
  assert.deepEqual(readManagedBlock(await readFile(join(dir, 'tinc.conf'), 'utf8')), ['ConnectTo = alpha', 'ConnectTo = beta'])
  assert.ok((await readFile(join(dir, 'tinc.conf'), 'utf8')).startsWith(conf), 'the lines outside the block stay as they were')

  // The same peer objects in a router network: the mode alone changes the files (and tincd must re-read them).
  const back = await renderTinc(router, opts(dir, { written }))
  assert.deepEqual(back.written.sort(), ['alpha', 'beta'])
  assert.ok(back.hupNeeded)
  assert.match(await readFile(join(hosts, 'alpha'), 'utf8'), /^Subnet = 10\.99\.0\.2\/32$/m)
  assert.deepEqual(back.modeMismatch, { conf: 'switch', network: 'router' })
  assert.match(await readFile(join(dir, 'tinc.conf'), 'utf8'), /^Mode = switch$/m, 'the renderer never rewrites Mode')
})

test('with a ConnectTo keeper, the block holds its choice among the public peers only, and a change of choice HUPs tincd', async () => {
  const { dir } = await fixture()
  const gamma = nodeRecord('gamma', 6, rsaPublicPem())
  const view = viewOf(alpha, beta, gamma, { ...hidden, addresses: [] })
  const offered: string[][] = []
  const choose = (pick: string[]) => (publics: readonly string[]) => {
    offered.push([...publics])
    return pick
  }
  const first = await renderTinc(view, opts(dir, { chooseConnectTo: choose(['gamma', 'alpha']) }))
  assert.deepEqual(offered, [['alpha', 'beta', 'gamma']], 'only public peers are candidates; nodes behind NAT never are')
  assert.deepEqual(readManagedBlock(await readFile(join(dir, 'tinc.conf'), 'utf8')), ['ConnectTo = alpha', 'ConnectTo = gamma'])
  assert.deepEqual(first.connectTo, ['alpha', 'gamma'])
  const same = await renderTinc(view, opts(dir, { chooseConnectTo: choose(['alpha', 'gamma']) }))
  assert.equal(same.confChanged, false, 'the same choice in another order is no change')
  const swapped = await renderTinc(view, opts(dir, { chooseConnectTo: choose(['alpha', 'beta']) }))
  assert.ok(swapped.confChanged && swapped.hupNeeded)
  assert.ok(swapped.reasons.includes('the ConnectTo set changed'))
})

test('a ConnectTo the operator wrote outside the block is not repeated in it: tincd would connect twice', async () => {
  const { dir } = await fixture()
  await writeFile(join(dir, 'tinc.conf'), 'Name = self\nStrictSubnets = yes\nConnectTo = beta\n')
  const view = viewOf(alpha, beta)
  const r = await renderTinc(view, opts(dir))
  assert.deepEqual(r.connectTo, ['alpha'])
  const conf = await readFile(join(dir, 'tinc.conf'), 'utf8')
  assert.deepEqual(readManagedBlock(conf), ['ConnectTo = alpha'])
  assert.match(conf, /^ConnectTo = beta$/m, "the operator's line stays")
})
