"""promptcache data plane: the domain (blocks, tokens, classification, pricing), the index and the HTTP proxy."""
