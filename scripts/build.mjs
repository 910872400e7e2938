// The build: one bundle of the CLI and the three modules started as separate processes or threads
// (the DNS worker, the join broker and the join front), with the code they share in chunks beside
// them, all in dist/cli/. A bundle holds far fewer module records and less source than the same
// code as some 150 compiled files plus node_modules: `tinc-consul run` resides in about 30 MB less
// (docs/architecture.md, "How the cost grows"). Commands are imported on use (src/cli/main.ts), so a
// command's code is its own chunk and the daemon never loads the lab, install or join code.
// Every file sits two levels below the package root, like the sources in src/<dir>/, so paths
// built from import.meta.url (policy templates, unit files) resolve the same from either.
import { build } from 'esbuild'
import { rm } from 'node:fs/promises'

await rm('dist', { recursive: true, force: true })
await build({
  entryPoints: {
    'cli/main': 'src/cli/main.ts',
    'cli/worker': 'src/dns/worker.ts',
    'cli/join-broker-process': 'src/mesh/join-broker-process.ts',
    'cli/join-front-process': 'src/mesh/join-front-process.ts',
  },
  outdir: 'dist',
  chunkNames: 'cli/chunk-[hash]',
  bundle: true,
  splitting: true,
  format: 'esm',
  platform: 'node',
  target: 'node20',
  minify: true,
  // Stack traces keep the names functions and classes have in the sources.
  keepNames: false,
  // Dependencies written as CommonJS call require(); ESM has none, so the bundle makes one.
  banner: { js: "import { createRequire as __tcRequire } from 'node:module'; const require = __tcRequire(import.meta.url);" },
  logLevel: 'warning',
})
