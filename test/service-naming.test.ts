import { describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { nodePolicyRules } from '../src/consul/acl.ts'
import { kvLayout } from '../src/mesh/kv-layout.ts'
import { decodeJson, networkRecordSchema } from '../src/mesh/record.ts'
import { meshServices } from '../src/mesh/services.ts'
import type { MeshView } from '../src/mesh/view.ts'
import { parseDefinitionText } from '../src/services/definition.ts'
import { MAX_CONSUL_NAME, namingFor, policyScopeFor, scopedPrefix, serviceNaming } from '../src/services/naming.ts'
import { planRegistrations } from '../src/services/registration.ts'

const NETWORK = { v: 1 as const, cidr: '10.99.0.0/24', domain: 'mesh', createdAt: '2026-01-01T00:00:00Z' }

const viewOf = (network: object, peers: Record<string, string>): MeshView =>
  ({
    network: { ...NETWORK, ...network },
    peers: new Map(Object.entries(peers).map(([name, vpnAddress]) => [name, { record: { name, vpnAddress, addresses: [], fingerprint: `sha256:${'0'.repeat(64)}` } }])),
  }) as unknown as MeshView

/** A passing health entry of network `home`, as Consul's /v1/health/service/NAME returns it; filed under its own node unless told. */
const entry = (consulName: string, node: string, address: string, port: number, id = `mesh-home-${consulName}-${node}-${port}`, filedUnder = node) => ({
  Node: { Node: filedUnder },
  Service: { ID: id, Service: consulName, Address: address, Port: port, Tags: [], Meta: { 'mesh-net': 'home', 'mesh-node': node } },
})

const DNS_LABEL = /^[a-z0-9](?:[a-z0-9-]*[a-z0-9])?$/

describe('service names in Consul carry the network and the node', () => {
  test('mesh names and Consul names map both ways in one place; bare names are the same in both', () => {
    const scoped = serviceNaming('home', 'scoped')
    assert.equal(scoped.prefix, 'tinc-home--')
    assert.equal(scoped.nodePrefix('node1'), 'tinc-home--node1--')
    assert.equal(scoped.toConsul('node1', 'nfs'), 'tinc-home--node1--nfs')
    assert.equal(scoped.toMesh('tinc-home--node1--nfs'), 'nfs')
    assert.equal(scoped.toMesh('tinc-home--node1--nfs--v4'), 'nfs--v4', 'the node part ends at the first --')
    assert.equal(scoped.toMesh('nfs'), undefined, 'a bare name is outside the scope')
    assert.equal(scoped.toMesh('tinc-home--nfs'), undefined, 'a name without a node part')
    assert.equal(scoped.toMesh('tinc-home--node1--'), undefined, "a node's prefix alone names nothing")
    assert.equal(scoped.toMesh('tinc-home----nfs'), undefined, 'an empty node part')
    assert.equal(scoped.toMesh('tinc-home-lab--node1--web'), undefined, "another network's name")
    assert.equal(scoped.belongsTo('tinc-home--node1--nfs', 'node1'), true)
    assert.equal(scoped.belongsTo('tinc-home--node1--nfs', 'node2'), false)
    assert.equal(scoped.belongsTo('tinc-home--node12--nfs', 'node1'), false, "node1's prefix doesn't cover node12's names")
    assert.equal(scoped.belongsTo('tinc-home--node1--nfs', 'Node1'), false, 'Node1 is another node part, not node1 in other case')
    const bare = serviceNaming('home', 'bare')
    assert.equal(bare.prefix, '')
    assert.equal(bare.nodePrefix('node1'), '')
    assert.equal(bare.toConsul('node1', 'nfs'), 'nfs')
    assert.equal(bare.toMesh('nfs'), 'nfs')
    assert.equal(bare.belongsTo('nfs', 'anyone'), true, "bare names don't say whose they are")
  })

  test("every network's prefix is made of DNS label characters, and none starts another's", () => {
    const nets = ['home', 'home-lab', 'home-', 'home--lab', 'Home', 'home_lab', 'HOME_LAB', 'a', 'a-b', 'a_b', '_', '-', 'x1', 'x12345678901234567890123456789012'.slice(0, 32)]
    const prefixes = nets.map(scopedPrefix)
    for (const p of prefixes) assert.match(p, /^tinc-[a-z0-9](?:[a-z0-9-]*[a-z0-9])?--$/, p)
    assert.equal(new Set(prefixes).size, nets.length, 'one prefix per network')
    for (const [i, a] of prefixes.entries()) for (const [j, b] of prefixes.entries()) if (i !== j) assert.equal(b.startsWith(a), false, `${a} (${nets[i]}) must not cover ${b} (${nets[j]})`)
    assert.equal(scopedPrefix('home-lab'), 'tinc-home-lab--', 'a plain label is used as it is')
  })

  test("every node's prefix is lower case DNS label characters, one per tinc name, and none starts another's", () => {
    // tinc names: letters, digits, '_'. Upper case and '_' get a hash, so case and '_' runs still tell nodes apart.
    const nodes = ['node1', 'node12', 'node', 'Node1', 'NODE1', 'node_1', 'node__1', 'node1_', '_node1', '_', '__', 'My_Laptop', 'my_laptop', 'a1b2c3', 'x']
    const naming = serviceNaming('home', 'scoped')
    const prefixes = nodes.map((n) => naming.nodePrefix(n))
    for (const p of prefixes) {
      assert.ok(p.startsWith('tinc-home--'), p)
      const part = p.slice('tinc-home--'.length, -2)
      assert.match(part, DNS_LABEL, p)
      assert.doesNotMatch(part, /--/, p)
      assert.equal(naming.toMesh(`${p}web`), 'web', p)
    }
    assert.equal(new Set(prefixes).size, nodes.length, 'one prefix per node')
    for (const [i, a] of prefixes.entries()) for (const [j, b] of prefixes.entries()) if (i !== j) assert.equal(b.startsWith(a), false, `${a} (${nodes[i]}) must not cover ${b} (${nodes[j]})`)
    assert.equal(naming.nodePrefix('node1'), 'tinc-home--node1--', 'a lower-case tinc name is used as it is')
    assert.match(naming.nodePrefix('My_Laptop'), /^tinc-home--my-laptop-[0-9a-f]{6}--$/)
    // No node of one network writes a name of a network whose name extends it.
    assert.equal(serviceNaming('home-lab', 'scoped').toConsul('node1', 'web').startsWith(naming.nodePrefix('lab')), false)
  })

  test('the network record says which; a record without the field (an older release) means bare names', () => {
    const old = decodeJson(JSON.stringify(NETWORK), networkRecordSchema)
    assert.ok(old.ok)
    assert.equal(old.value.serviceNames, undefined)
    assert.equal(namingFor('home', old.value).mode, 'bare')
    const scoped = decodeJson(JSON.stringify({ ...NETWORK, serviceNames: 'scoped' }), networkRecordSchema)
    assert.ok(scoped.ok)
    assert.equal(namingFor('home', scoped.value).prefix, 'tinc-home--')
    assert.equal(decodeJson(JSON.stringify({ ...NETWORK, serviceNames: 'any' }), networkRecordSchema).ok, false)
  })

  test('the node policy reads the network\'s names and writes only the node\'s own; only bare names get service_prefix ""', async () => {
    const layout = kvLayout('home')
    const serviceRules = (rules: string) => [...rules.matchAll(/^service(?:_prefix)? "([^"]*)" \{\n\s+policy = "(\w+)"\n\}$/gm)].map((m) => `${m[1]} ${m[2]}`)
    const scoped = await nodePolicyRules(policyScopeFor(layout, 'home', { serviceNames: 'scoped' }), 'alice')
    assert.deepEqual(serviceRules(scoped), ['tinc-home-- read', 'tinc-home--alice-- write'])
    assert.equal((scoped.match(/^service/gm) ?? []).length, 2, 'no other service rule')
    const other = await nodePolicyRules(policyScopeFor(layout, 'home', { serviceNames: 'scoped' }), 'Alice_2')
    assert.match(other, /^service_prefix "tinc-home--alice-2-[0-9a-f]{6}--" \{\n\s+policy = "write"/m)
    const bare = await nodePolicyRules(policyScopeFor(layout, 'home', {}), 'alice')
    assert.deepEqual(serviceRules(bare), [' read', ' write'])
    const scope = policyScopeFor(layout, 'home', { serviceNames: 'scoped' })
    await assert.rejects(nodePolicyRules({ ...scope, nodeServices: () => 'x" {} key_prefix "' }, 'alice'), { code: 'BAD_SERVICE_PREFIX' })
    await assert.rejects(nodePolicyRules({ ...scope, nodeServices: () => 'tinc-work--alice--' }, 'alice'), { code: 'BAD_SERVICE_PREFIX' })
  })

  test("the reader takes only names in the network's scope, and serves every node's instances under their mesh name", () => {
    const raw = new Map<string, unknown[]>([
      ['nfs', [entry('nfs', 'n1', '10.99.0.1', 2049)]],
      ['tinc-home--web', [entry('tinc-home--web', 'n1', '10.99.0.1', 80)]],
      ['tinc-home--n1--web', [entry('tinc-home--n1--web', 'n1', '10.99.0.1', 80)]],
      ['tinc-home--n2--web', [entry('tinc-home--n2--web', 'n2', '10.99.0.2', 8080)]],
      ['tinc-home-lab--n1--db', [entry('tinc-home-lab--n1--db', 'n1', '10.99.0.1', 5432)]],
    ])
    const scoped = meshServices(raw, viewOf({ serviceNames: 'scoped' }, { n1: '10.99.0.1', n2: '10.99.0.2' }), 'home')
    assert.deepEqual(
      scoped.services.map((s) => [s.name, s.instances.map((i) => `${i.node}:${i.port}`)]),
      [['web', ['n1:80', 'n2:8080']]],
    )
    assert.deepEqual(scoped.refused, [], 'names outside the scope, or without a node part, are ignored, not refused')
    const bare = meshServices(raw, viewOf({}, { n1: '10.99.0.1', n2: '10.99.0.2' }), 'home')
    assert.deepEqual(
      bare.services.map((s) => s.name),
      ['nfs', 'tinc-home--n1--web', 'tinc-home--n2--web', 'tinc-home--web', 'tinc-home-lab--n1--db'],
      'a network without the field reads every name as it is',
    )
  })

  test("the reader refuses an instance that isn't its node's: named for n1 but filed under n2, or a mesh-node meta other than the node it is filed under", () => {
    const view = viewOf({ serviceNames: 'scoped' }, { n1: '10.99.0.1', n2: '10.99.0.2' })
    const raw = new Map<string, unknown[]>([
      // n2's own nfs, served.
      ['tinc-home--n2--nfs', [entry('tinc-home--n2--nfs', 'n2', '10.99.0.2', 2049)]],
      [
        'tinc-home--n1--nfs',
        [
          // n1's token wrote its own name, but filed it under n2 through the catalog, at n2's address, claiming n2.
          entry('tinc-home--n1--nfs', 'n2', '10.99.0.2', 2050, 'filed-under-n2'),
          // Filed under n1, claiming n2 and at n2's address: the meta is n1's own word.
          entry('tinc-home--n1--nfs', 'n2', '10.99.0.2', 2051, 'claims-n2', 'n1'),
          // An entry without its catalog node can't be judged.
          { Service: entry('tinc-home--n1--nfs', 'n1', '10.99.0.1', 2052, 'no-node').Service },
        ],
      ],
    ])
    const { services, refused } = meshServices(raw, view, 'home')
    assert.deepEqual(
      services.map((s) => [s.name, s.instances.map((i) => `${i.id} ${i.node}:${i.port}`)]),
      [['nfs', ['mesh-home-tinc-home--n2--nfs-n2-2049 n2:2049']]],
    )
    assert.deepEqual(
      refused.map((r) => [r.service, r.id, r.reason]),
      [
        ['nfs', 'filed-under-n2', '"tinc-home--n1--nfs" is not a name of node "n2", which it is filed under (its names start with "tinc-home--n2--")'],
        ['nfs', 'claims-n2', 'mesh-node "n2" is not "n1", the node it is filed under'],
        ['nfs', 'no-node', 'the entry names no catalog node'],
      ],
    )
  })
})

describe('a per-node cap on services', () => {
  test('readers take at most the cap from one node, the same ones everywhere, and report the rest', () => {
    const names = ['e', 'd', 'c', 'b', 'a']
    // Each node's instances come under its own names, and the reader counts them per node.
    const raw = new Map<string, unknown[]>(
      names.flatMap((n, i): Array<[string, unknown[]]> => [
        [`tinc-home--greedy--${n}`, [entry(`tinc-home--greedy--${n}`, 'greedy', '10.99.0.1', 1000 + i)]],
        [`tinc-home--modest--${n}`, [entry(`tinc-home--modest--${n}`, 'modest', '10.99.0.2', 2000 + i)]],
      ]),
    )
    const view = viewOf({ serviceNames: 'scoped' }, { greedy: '10.99.0.1', modest: '10.99.0.2' })
    const { services, refused } = meshServices(raw, view, 'home', 3)
    assert.deepEqual(
      services.map((s) => [s.name, s.instances.map((i) => i.node)]),
      [
        ['a', ['greedy', 'modest']],
        ['b', ['greedy', 'modest']],
        ['c', ['greedy', 'modest']],
      ],
    )
    assert.deepEqual(refused.map((r) => [r.service, r.reason]).sort(), [
      ['d', 'node "greedy" has more than 3 services (--max-services)'],
      ['d', 'node "modest" has more than 3 services (--max-services)'],
      ['e', 'node "greedy" has more than 3 services (--max-services)'],
      ['e', 'node "modest" has more than 3 services (--max-services)'],
    ])
  })

  test("a registrar registers at most the cap, in file-name order, under the node's own names, and refuses the rest", () => {
    const def = (file: string, name = file.replace(/\.toml$/, '')) => ({ def: parseDefinitionText(`name = "${name}"\nport = 80\n`, file, { allowScripts: false }) })
    const who = { net: 'home', node: 'n1', address: '10.99.0.1' }
    const long = 'x'.repeat(60)
    const defs = [def('d.toml'), def('b.toml'), def('long.toml', long), def('a.toml'), def('c.toml')]
    const { wanted, refused } = planRegistrations(defs, who, serviceNaming('home', 'scoped'), 3)
    assert.deepEqual(
      [...wanted.values()].map((e) => [e.def.file, e.reg.Name]),
      [
        ['a.toml', 'tinc-home--n1--a'],
        ['b.toml', 'tinc-home--n1--b'],
        ['c.toml', 'tinc-home--n1--c'],
      ],
    )
    assert.deepEqual(
      refused.map((r) => [r.file, r.reason]),
      [
        ['d.toml', "over this node's cap of 3 services (--max-services)"],
        ['long.toml', `"tinc-home--n1--${long}" is longer than 63 characters, one DNS label: this node's service names may have at most 48 characters`],
      ],
    )
    // The registration hash reaches the check: readers watch checks, not services.
    for (const { reg } of wanted.values()) assert.match(String(reg.Check.Notes), new RegExp(`mesh-def ${reg.Meta['mesh-def']}$`))
    // The limit is the whole Consul name, node part included: exactly 63 characters still registers.
    const edge = 'y'.repeat(MAX_CONSUL_NAME - 'tinc-home--n1--'.length)
    const fits = planRegistrations([def('edge.toml', edge), def('over.toml', `${edge}z`)], who, serviceNaming('home', 'scoped'), 3)
    assert.deepEqual(
      [...fits.wanted.values()].map((e) => e.reg.Name.length),
      [MAX_CONSUL_NAME],
    )
    assert.deepEqual(
      fits.refused.map((r) => r.file),
      ['over.toml'],
    )
  })
})
