/**
 * What one DNS query and one peer may cost the daemon, with the defaults and
 * the reasons for them. Plain data: the CLI parses flags into these without
 * loading the server, and the daemon sends the answer limits to its helpers
 * with every zone.
 */

/**
 * How much one answer may carry. The zone is built within these limits, so
 * UDP and TCP serve the same records, every query for a name gets the same
 * ones, and the server never has to cut a reply while answering.
 */
export interface AnswerLimits {
  /**
   * Bytes in a whole reply, counting the longest question a client can send
   * and our OPT record. Over TCP it is the most one query can add to a
   * connection's write buffer; over UDP the client's buffer (512 bytes, or its
   * EDNS size up to 1232) still decides, with TC when the answer is bigger.
   */
  maxAnswerBytes: number
  /** Instances of one service name in its A and SRV answers. */
  maxInstances: number
  /** Of those, how many may be on one node. */
  maxInstancesPerNode: number
}

/**
 * 64 instances: a client connects to one, a balancer wants a handful, and 64
 * SRV records with their glue are 3 to 12 KB. 8 per node: one node's
 * instances differ only by port, and a node that registers hundreds under one
 * name must not push every other node out. 16 KiB holds 64 instances on nodes
 * with 63-character names, with room; over TCP, nothing answers with more.
 */
export const DEFAULT_ANSWER_LIMITS: AnswerLimits = { maxAnswerBytes: 16_384, maxInstances: 64, maxInstancesPerNode: 8 }

export interface TcpLimits {
  /** TCP connections open at once, over every address served. */
  connections: number
  /** Of those, from one source address. */
  perSource: number
}

/**
 * 256 in all, shared by every address (it used to be 256 per address). 16 from
 * one source: a resolver keeps one connection per server and reuses it (RFC
 * 7766 asks clients for no more than one at a time), 16 leaves room for a busy
 * local resolver on 127.0.0.1, and no single VPN peer can take more than a
 * sixteenth of the slots. A connection holds at most about 224 KiB however
 * hostile its client (see serveTcp), so all of TCP together stays under 60 MB
 * with every slot taken, and one source under 4 MB.
 */
export const DEFAULT_TCP_LIMITS: TcpLimits = { connections: 256, perSource: 16 }
