import { fileURLToPath } from 'node:url'

/**
 * How to start our own CLI inside a namespace: from source through tsx when
 * this module itself runs from source (tests, `npm run lab`), else the build.
 */
export function cliArgv(): string[] {
  const here = import.meta.url
  if (here.endsWith('.ts')) {
    const cli = fileURLToPath(new URL('../cli/main.ts', here))
    return [process.execPath, '--import', import.meta.resolve('tsx'), cli]
  }
  return [process.execPath, fileURLToPath(new URL('../cli/main.js', here))]
}
