"""Operations on trees with adapters, written once over the method protocol: `init`, `merge` /
`unmerge`, the `optimizer`, sharding specs and checkpoints."""
