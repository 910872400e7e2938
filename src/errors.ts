/**
 * Every error we raise on purpose carries a stable `code`, so callers and tests
 * can branch on it without matching message text, and keeps the original error
 * as `cause` so `--debug` can show the whole chain.
 */
export class TincConsulError extends Error {
  override name = 'TincConsulError'
  readonly code: string

  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(message, options)
    this.code = code
  }
}

/** The user asked for something that cannot work as given (bad flag, unknown node). */
export class UsageError extends TincConsulError {
  override name = 'UsageError'
}

/** A required tool (tincd, consul, ip…) is missing or the wrong version. */
export class ProvisionError extends TincConsulError {
  override name = 'ProvisionError'
}

/** A command we ran exited non-zero or could not start. */
export class CommandError extends TincConsulError {
  override name = 'CommandError'
  readonly exitCode: number | null
  readonly stderr: string

  constructor(message: string, exitCode: number | null, stderr: string, options?: { cause?: unknown }) {
    super('COMMAND_FAILED', message, options)
    this.exitCode = exitCode
    this.stderr = stderr
  }
}

/** The network-namespace lab could not be built, reached or torn down. */
export class LabError extends TincConsulError {
  override name = 'LabError'
}

/** A Consul HTTP call failed: unreachable agent, non-2xx status, or a body we can't use. */
export class ConsulError extends TincConsulError {
  override name = 'ConsulError'
  readonly status: number | undefined

  constructor(code: string, message: string, status?: number, options?: { cause?: unknown }) {
    super(code, message, options)
    this.status = status
  }
}
