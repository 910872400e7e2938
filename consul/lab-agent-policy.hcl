# ACL policy for the Consul client agents in the lab (tinc-consul lab up --acl).
# An agent needs to register its own node in the catalog and read services for
# anti-entropy; it gets no KV rights at all, so anything that touches KV must
# bring its own token. Real deployments scope node rights to the node's name
# (see docs/security.md); the lab's nodes are all ours, so a prefix is enough.
node_prefix "" {
  policy = "write"
}

service_prefix "" {
  policy = "read"
}
