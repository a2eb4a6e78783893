"""The swarm library: everything a peer needs, with no argv parsing, logging set-up or process starting.

- ``config``: the one typed swarm config (shared sections vs ``peer``), YAML loading, ``--set`` overrides.
- ``records``: DHT key names and record schemas (signed config, trainers' progress records) and validators.
- ``addresses``: multiaddr checks that need no stack (the CLI runs them before importing it).
- ``net``: identities, hivemind's multiaddr parse, starting the DHT with bounded retries and clear errors.
- ``discovery``: publishing the signed config and fetching it given nothing but an address.
- ``access``: private swarms: access tokens signed by the seed's key, DHT authorization, members-only averagers.
- ``tokenizer``, ``data``, ``model``: byte tokenizer, corpora and per-peer shards, causal LMs from configs.
- ``compression``: the averaging codecs, wire byte counters, and a start-up check of the 8-bit codecs.
- ``optimizer``: hivemind.Optimizer built from the config, recording each global step's averaging outcome.
- ``rounds``: round outcomes (averaged / partial / skipped / failed) and partial-round detection.
- ``devices``: device, precision and batch size choices.
- ``training``: the training loop; ``progress``: publishing/reading progress records; ``summary``: run summaries.
- ``checkpoint``: checkpoint files (safetensors only), written atomically, last K kept; ``evaluation``: held-out loss.
- ``files``: durable atomic writes.
"""
