import { UsageError } from '../errors.ts'

export function parseIntFlag(name: string, value: string | undefined, min: number, max: number): number {
  const n = Number(value)
  if (value === undefined || value === '' || !Number.isInteger(n) || n < min || n > max) {
    throw new UsageError('BAD_FLAG', `--${name} must be a whole number from ${min} to ${max}, got "${value ?? ''}"`)
  }
  return n
}
