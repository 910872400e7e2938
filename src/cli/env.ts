/**
 * Every flag's default can be overridden by TINC_CONSUL_<NAME> (dashes become
 * underscores), so a systemd unit or CI job can configure without long argv.
 */
export function envName(flag: string): string {
  return `TINC_CONSUL_${flag.toUpperCase().replace(/-/g, '_')}`
}

export function envDefault(flag: string, fallback: string): string {
  return process.env[envName(flag)] ?? fallback
}

export function envFlag(flag: string, fallback = false): boolean {
  const v = process.env[envName(flag)]
  if (v === undefined) return fallback
  return /^(1|true|yes|on)$/i.test(v)
}

/** Describes a flag with its env var, so `--help` tells people both ways in. */
export function described(text: string, flag: string): string {
  return `${text} [env: ${envName(flag)}]`
}
