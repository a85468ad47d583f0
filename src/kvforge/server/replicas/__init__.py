"""`kvforge serve --replicas N`: N engine replicas on Ray Serve behind one OpenAI-compatible endpoint.

The process that runs the command is the front: the same FastAPI routes, guard and errors as one
server, over a backend (`frontend.ReplicaBackend`) that tokenizes each request and hands it, as a
`Prompt`, to the `kvforge-engine` deployment through a Ray Serve handle. Each replica
(`replica.EngineReplica`) holds a whole engine of its own (model, KV memory, kept prefixes) and
the shared store (`--store`, Redis across machines). The handle's request router
(`router.PrefixAffinityRouter`) sends a prompt to the replica that was sent the longest run of its
first blocks (`routing.AffinityTable`), unless that replica is far busier than the least busy one;
the replica it lands on finds the prefix in its memory, else in the shared store. Replicas push
their metrics to a board actor (`board.MetricsBoard`), from which /metrics sums them and labels
them per replica. Ray is imported here only: the package is reached only by `--replicas`.
"""
