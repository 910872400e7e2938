/**
 * The one place the Consul version is pinned. It is the newest stable 1.x the
 * module proxy serves that builds with the machine's Go toolchain (go >= 1.25.9).
 * Bumping it means a fresh build into a new cache slot on the next provision.
 */
export const CONSUL_VERSION = '1.22.7'
export const CONSUL_MODULE = 'github.com/hashicorp/consul'

/**
 * Consul's go.mod replaces its nested modules with local folders, and a module
 * zip never contains nested modules, so a requiring module gets the published
 * versions its go.mod names instead. For v1.22.7 the named api (v1.33.7) is too
 * old for the command code (no ACLToken.Name); v1.34.2 is the api release cut
 * alongside it. Bump these together with CONSUL_VERSION.
 */
export const CONSUL_NESTED_MODULES: Readonly<Record<string, string>> = {
  'github.com/hashicorp/consul/api': 'v1.34.2',
}
