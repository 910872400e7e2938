import { run } from '../../util/exec.ts'

/**
 * nftables, as the sidecar's own tables use it (the masquerade table, src/mesh/daemon/masquerade.ts,
 * and the access table, src/mesh/daemon/access-firewall.ts): each change is one script, loaded by
 * `nft -f` in one transaction, that first takes the table away and then declares it anew.
 */

/**
 * The lines that leave no table of this name. Declaring the table first makes the delete succeed
 * whether or not it existed, so a script starting with them replaces the table in one transaction.
 */
export const dropTableLines = (family: 'ip' | 'inet', table: string): string[] => [`table ${family} ${table} {}`, `delete table ${family} ${table}`]

/** Loads a script; rejects (CommandError) when nft is missing, not allowed, refuses it or takes longer than 10 s. */
export async function loadNftScript(script: string): Promise<void> {
  await run(['nft', '-f', '-'], { input: script, timeoutMs: 10_000 })
}
